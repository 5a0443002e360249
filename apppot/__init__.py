"""apppot: run Linux software appliances (VM disk images) as HTCondor batch jobs."""

__version__ = "0.1.0"
