"""`zpipe run` in a real terminal (tmux): the live view shows every node and a moving progress bar, untorn."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from support import ROOT, steady_topology

SCAN = re.compile(r"^scan 1 streaming .*?([\d,]+)/(?:[\d,]+|\?)", re.M)
ROWS = [*(f"producer[{i}]" for i in range(4)), "aggregator[0]", "nodegroup[0]", "nodegroup[1]"]





@pytest.fixture
def tmux():
    """A private tmux server (its own socket), so a user's sessions are never touched; killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux); the live view needs a real terminal to test")
    sock = f"zpipe-test-{os.getpid()}"

    def cmd(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    try:
        yield cmd
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.timeout(150)
def test_live_view_in_a_terminal(tmp_path, tmux):
    run = (f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} -m zpipe run "
           f"{shlex.quote(steady_topology(tmp_path))} --output-dir {shlex.quote(str(tmp_path / 'out'))}; "
           f"echo ZPIPE-EXIT=$?; sleep 300")
    tmux("new-session", "-d", "-s", "live", "-x", "100", "-y", "40", run)
    counts, screens = [], []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", "live")
        if "ZPIPE-EXIT=" in screen:
            break
        if m := SCAN.search(screen):
            counts.append(int(m.group(1).replace(",", "")))
            screens.append(screen)
        time.sleep(0.7)
    assert len(set(counts)) >= 3, f"the progress bar did not move: {counts}\n" + "\n".join(screens[-1:])
    assert counts == sorted(counts), counts
    moving = screens[len(screens) // 2]
    lines = moving.splitlines()
    for row in ROWS:
        assert any(line.startswith(row) and "streaming" in line for line in lines), (row, moving)
    assert "━" in moving and max(len(line) for line in lines) <= 100

    deadline = time.monotonic() + 60
    while "ZPIPE-EXIT=" not in (screen := tmux("capture-pane", "-p", "-t", "live")) and time.monotonic() < deadline:
        time.sleep(0.5)
    history = tmux("capture-pane", "-p", "-S", "-", "-t", "live")
    assert "ZPIPE-EXIT=0" in history, history
    assert re.search(r"^scan 1 done .*16,384/16,384 100%", history, re.M), history
    assert "4dcamera-local: done in" in history  # stdout's summary, after the view
    # Untorn: the region was redrawn in place, so its header is in the scrollback once, with the
    # node groups' relayed log line printed above it, not through it.
    assert history.count("GB/s in GB/s out") == 1, history
    assert history.index("[nodegroup[") < history.index("GB/s in GB/s out"), history
