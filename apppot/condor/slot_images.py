"""STARTD_CRON job `apppot_images`: print the slot attributes naming the node's base images.

The plugin's `-classad` answer already carries them (StartdAttrs), but only a starter of HTCondor
23.7 or later passes a plugin's StartdAttrs on to the slot ad (the 23.0 LTS series drops them), and
the startd asks the plugin only at start-up and on condor_reconfig. This cron job publishes the same
attributes on every series and picks up images added later within its period (50-apppot.conf).
"""

from __future__ import annotations

import sys

from apppot import store


def listable(name: str) -> bool:
    """Whether a name can go into the string list: the startd reads old-style ClassAd lines, whose
    strings have no escape for a backslash, and a comma would split the name in stringListMember."""
    return name.isprintable() and not any(c in name for c in '",\\')


def main() -> int:
    names = [n for n in store.list_images(store.image_dirs(env_first=True)) if listable(n)]
    # the output format of a startd cron job: one `Attr = value` per line
    sys.stdout.write(f'HasAppPot = {"true" if names else "false"}\nAppPotImages = "{",".join(names)}"\n')
    return 0
