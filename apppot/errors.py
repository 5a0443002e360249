"""The one exception type users see: a message and, when we know it, how to fix it."""

from __future__ import annotations


class ApppotError(Exception):
    """A problem the user can act on. `hint` says how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class NotFoundError(ApppotError):
    """The thing named does not exist (an image, a kernel)."""


class UnreadableError(ApppotError):
    """It exists but this user may not read it."""
