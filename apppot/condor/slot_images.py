"""STARTD_CRON job `apppot_images`: print the slot attributes naming the node's base images.

The plugin's `-classad` answer already carries them (StartdAttrs), but only a starter of HTCondor
23.7 or later passes a plugin's StartdAttrs on to the slot ad (the 23.0 LTS series drops them), and
the startd asks the plugin only at start-up and on condor_reconfig. This cron job publishes the same
attributes on every series and picks up images added later within its period (50-apppot.conf).

It also lists the node's image cache (APPPOT_CACHE_DIR, filled by the fetch service): the digests of
its complete entries as AppPotCachedImages = "sha256:HEX,...", so a job pinned to a digest can prefer a
node that holds it already (the templates' rank). Read-only: a directory listing, nothing is opened.
"""

from __future__ import annotations

import os
import stat
import sys

from apppot import imagecache, store


def listable(name: str) -> bool:
    """Whether a name can go into the string list: the startd reads old-style ClassAd lines, whose
    strings have no escape for a backslash, and a comma would split the name in stringListMember."""
    return name.isprintable() and not any(c in name for c in '",\\')


def cached_digests(cache_dir: str) -> list[str]:
    """"sha256:HEX" of each complete entry in CACHE_DIR/sha256/ (the fetch service renames an entry
    there only once verified). Anything else there -- a name that is no digest, a symlink, a directory
    -- is not an entry and not advertised."""
    try:
        names = os.listdir(os.path.join(cache_dir, "sha256"))
    except OSError:  # no cache (yet): nothing cached
        return []
    digests = []
    for name in names:
        if not imagecache.is_digest(name):
            continue
        try:
            if stat.S_ISREG(os.lstat(imagecache.entry_path(cache_dir, name)).st_mode):
                digests.append(f"sha256:{name}")
        except OSError:  # evicted meanwhile
            continue
    return sorted(digests)


def main() -> int:
    names = [n for n in store.list_images(store.image_dirs(env_first=True)) if listable(n)]
    cached = cached_digests(imagecache.cache_dir())  # the knob APPPOT_CACHE_DIR, the cron job's environment first
    # the output format of a startd cron job: one `Attr = value` per line
    sys.stdout.write(f'HasAppPot = {"true" if names else "false"}\nAppPotImages = "{",".join(names)}"\n'
                     f'AppPotCachedImages = "{",".join(cached)}"\n')  # fmt: skip
    return 0
