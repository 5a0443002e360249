"""`make demo`: the main job on the embedded default image, staged exactly as condor_starter would.

1. build (or reuse) the tiny image in the node's image directory;
2. run the apppot:// plugin the way HTCondor's starter does: -infile with request ads, a
   pre-allocated -outfile, in the job's sandbox; show the result ads and `qemu-img info`;
3. `apppot run` a command in the staged UML disk and print its output and exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from apppot import build

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("APPPOT_CACHE", "/var/cache/apppot"))


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def main() -> int:
    images = CACHE / "images"
    tiny = images / "tiny.img"
    if not tiny.exists():
        say(f"building the tiny image {tiny}")
        build.build_tiny(tiny)
    # The plugin's `#!/usr/bin/env python3` must find a Python with HTCondor's bindings: ours.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "APPPOT_IMAGE_PATH": os.fspath(images), "PYTHONPATH": os.fspath(REPO), "PATH": path}
    with tempfile.TemporaryDirectory(prefix="apppot-demo-sandbox-") as sandbox:
        sb = Path(sandbox)
        urls = ["apppot://tiny", "apppot://tiny.img?format=uml"]
        infile, outfile = sb / ".apppot_plugin.in", sb / ".apppot_plugin.out"
        infile.write_text("".join(f'[ Url = "{u}"; LocalFileName = "{sb / u[9:].split("?")[0]}" ]' for u in urls))
        outfile.write_bytes(b" " * 19264)  # HTCondor pre-allocates the outfile so a full disk shows early
        say("staging through the plugin, as condor_starter does: apppot_plugin -infile IN -outfile OUT")
        rc = subprocess.call([os.fspath(REPO / "plugins/apppot_plugin"), "-infile", os.fspath(infile),
                              "-outfile", os.fspath(outfile)], env=env, cwd=sb)  # fmt: skip
        print(outfile.read_text())
        print(f"plugin exit status: {rc}")
        if rc != 0:
            return rc
        say("qemu-img info of the qcow2 overlay (VM universe / qemu / libvirt)")
        subprocess.call(["qemu-img", "info", os.fspath(sb / "tiny")])
        say(f"sandbox: {', '.join(f'{p.name} ({p.stat().st_blocks * 512} bytes on disk)' for p in sorted(sb.iterdir()))}")
        say("apppot run --image tiny.img -- sh -c '...'   (UML, on the staged COW file)")
        (sb / "input.txt").write_text("3 1 2\n")
        cmd = [sys.executable, "-m", "apppot", "run", "--image", "tiny.img", "--discard-disk", "--",
               "sh", "-c", 'echo "hello from $(uname -sr) as $(id -un)"; tr " " "\\n" < input.txt | sort -n > sorted.txt; exit 42']  # fmt: skip
        status = subprocess.call(cmd, env=env, cwd=sb)
        print(f"exit status of the job: {status}")
        print(f"sorted.txt written by the job: {(sb / 'sorted.txt').read_text().split()}")
        return 0 if status == 42 else 1


if __name__ == "__main__":
    sys.exit(main())
