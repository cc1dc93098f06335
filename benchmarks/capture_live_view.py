"""Capture `zpipe run`'s live view in a real terminal (a private tmux server) twice during one scan, and
write what it showed to docs/live-view-preview.md: the text of the screen, and its preview pictures
decoded from the terminal's grey levels (the half blocks carry their picture in colour only).

Usage: python benchmarks/capture_live_view.py [--out docs/live-view-preview.md]
Needs tmux. Uses a 32 x 24 simulated scan, slowed to 150 frames/s so the pictures build up slowly.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = """\
name: stem-live
nodes:
  producer:
    role: producer
    plugin: 4dcamera-sim
    replicas: 4
    threads: 1
    params: {scan_shape: [32, 24], electrons_per_frame: 40, first_frame: 1000, rate: 120}
    sockets:
      data: {pattern: push, connect: aggregator.in}
  aggregator:
    role: aggregator
    threads: 4
    route: frame_number
    sockets:
      in: {pattern: pull}
      out: {pattern: push, connect: nodegroup.data}
  nodegroup:
    role: nodegroup
    replicas: 2
    threads: 4
    batch: 4
    assemble: {key: frame_number, part: module, parts: 4, shape: [144, 576], dtype: uint16}
    analyses:
      - plugin: virtual-detectors
        name: vd
        params:
          detectors:
            bf: {centre: [288, 288], outer: 40}
            adf: {centre: [288, 288], inner: 60, outer: 250}
    sockets:
      data: {pattern: pull}
"""
CELL = re.compile(r"\x1b\[([0-9;]*)m|(▀)|([^\x1b])")
LEVELS = " .:-=+*#%@"


def decode(line: str) -> list[tuple[int | None, int | None]] | None:
    """(top, bottom) grey level (0..23, None where blank) of each half block on a captured line."""
    fg = bg = None
    cells = []
    for m in CELL.finditer(line):
        if m.group(1) is not None:
            codes = m.group(1).split(";")
            i = 0
            while i < len(codes):
                if codes[i] in ("38", "48") and i + 2 < len(codes) and codes[i + 1] == "5":
                    n = int(codes[i + 2])
                    level = n - 232 if 232 <= n <= 255 else None
                    if codes[i] == "38":
                        fg = level
                    else:
                        bg = level
                    i += 3
                    continue
                if codes[i] in ("0", "", "39"):
                    fg = None
                if codes[i] in ("0", "", "49"):
                    bg = None
                i += 1
        elif m.group(2):
            cells.append((fg, bg))
    return cells or None


def pictures(screen: str) -> list[str]:
    """The preview pictures of a captured screen, as text: one character per cell, darker to brighter."""
    rows = [decode(line) for line in screen.splitlines()]
    out = []
    for cells in rows:
        if not cells:
            continue
        for half in (0, 1):
            out.append("".join(" " if c[half] is None else LEVELS[min(9, c[half] * 10 // 24)] for c in cells))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "live-view-preview.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zpipe-live-"))
    topo = tmp / "stem-live.yaml"
    topo.write_text(TOPOLOGY)
    sock = f"zpipe-capture-{os.getpid()}"

    def tmux(*a: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *a], capture_output=True, text=True, timeout=10, check=True).stdout

    run = (f"cd {shlex.quote(str(ROOT))} && TERM=xterm-256color {shlex.quote(sys.executable)} -m zpipe run "
           f"{shlex.quote(str(topo))} --output-dir {shlex.quote(str(tmp / 'out'))}; echo ZPIPE-EXIT=$?; sleep 120")
    captures = []
    try:
        tmux("new-session", "-d", "-s", "live", "-x", "110", "-y", "48", run)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(captures) < 2:
            screen = tmux("capture-pane", "-e", "-p", "-t", "live")
            plain = tmux("capture-pane", "-p", "-t", "live")
            if "ZPIPE-EXIT=" in plain:
                break
            m = re.search(r"scan 1 streaming .*?([\d,]+)/", plain)
            if "as it builds up" in plain and m and int(m.group(1).replace(",", "")) > (1000 if captures else 600):
                captures.append((plain, pictures(screen), int(m.group(1).replace(",", ""))))
                time.sleep(3)
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=10)
    if len(captures) < 2:
        print("the live view never showed two pictures of the scan under way", file=sys.stderr)
        return 1
    changed = captures[0][1] != captures[1][1]
    text = ["# The live view's preview pictures, captured", "",
            "Written by `python benchmarks/capture_live_view.py`: `zpipe run` of a 32 x 24 simulated 4D-Camera",
            "scan (slowed to 120 frames/s) with the `virtual-detectors` analysis, in a real terminal (tmux, 110 x 48),",
            "captured twice, three seconds apart. The screen is shown as text; its pictures are drawn in grey",
            "levels, which text cannot show, so each is also decoded from the terminal's colours below",
            f"(`{LEVELS}`: darker to brighter; blank: no frame at that position yet). The pictures",
            f"{'changed' if changed else 'did NOT change'} between the captures.", ""]
    for i, (plain, pics, received) in enumerate(captures, 1):
        text += [f"## Capture {i}: {received:,} sectors received", "", "```", plain.rstrip(), "```", "",
                 "Its pictures (vd.adf, then vd.bf, side by side, as on the screen), decoded:", "", "```", *pics,
                 "```", ""]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}; pictures changed between captures: {changed}")
    return 0 if changed else 1


if __name__ == "__main__":
    sys.exit(main())
