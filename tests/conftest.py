"""Shared fixtures: the repository's paths, and a clean `zpipe` command for subprocess tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"


def zpipe(*args: str, timeout: float = 60, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the zpipe command as a user would; never hangs a test (timeout kills it)."""
    return subprocess.run([sys.executable, "-m", "zpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture
def run_zpipe():
    return zpipe
