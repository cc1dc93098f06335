"""Shared fixtures."""

from __future__ import annotations

import pytest

from support import zpipe


@pytest.fixture
def run_zpipe():
    return zpipe
