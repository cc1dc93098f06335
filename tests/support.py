"""Helpers shared by the tests: the repository's paths, and the `zpipe` command run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"


def zpipe(*args: str, timeout: float = 60, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the zpipe command; never hangs a test (the timeout kills it)."""
    return subprocess.run([sys.executable, "-m", "zpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
