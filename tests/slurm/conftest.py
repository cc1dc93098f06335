"""The private single-node Slurm (tests/private_slurm.py) for the tests marked `slurm`: started once per
test run where it can run (root, Debian's packages), stopped by pid afterwards; skipped elsewhere, saying why."""

from __future__ import annotations

import psutil
import pytest

from private_slurm import PrivateSlurm, unavailable
from sessions import Site, service_topology
from slurm_site import wait_for
from test_sessions import free_port


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


# A facility's services on loopback, beside the private Slurm: every job cancelled and every process ended.
@pytest.fixture
def site(tmp_path, slurm):
    port = free_port()
    topo = service_topology(tmp_path / "services.yaml", port=port, hosts={"servers": "127.0.0.1",
                                                                        "compute": "127.0.0.1"})
    s = Site(topo, tmp_path, f"tcp://127.0.0.1:{port}")
    s.jobs = []
    try:
        yield s
    finally:
        for job in s.jobs:
            slurm.run("scancel", job, timeout=20)
        wait_for(lambda: all(slurm.job_state(j) not in ("RUNNING", "PENDING", "COMPLETING") for j in s.jobs), 60,
                 "the session jobs did not end")
        killed = s.close()
        assert not killed, f"processes that had to be killed: {killed}"
        left = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                if str(topo) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes left behind: {left}"
