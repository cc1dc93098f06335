"""The private single-node Slurm (tests/private_slurm.py) for the tests marked `slurm`: started once per
test run where it can run (root, Debian's packages), stopped by pid afterwards; skipped elsewhere, saying why."""

from __future__ import annotations

import pytest

from private_slurm import PrivateSlurm, unavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(f"no private Slurm: {why}")
    cluster = PrivateSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        killed = cluster.stop()
        assert not killed, f"the private Slurm left processes that had to be killed: {killed}"
        assert not cluster.stepds(), "slurmstepd processes are left"
