"""A session of node groups as a Slurm job (issue 13, acceptance 2): producer services and the aggregator run;
`zpipe submit` starts a job of two node groups; two acquisitions stream exactly; `scancel` ends the job and the
session leaves cleanly; the next acquisition goes to disk; `zpipe sessions` shows the job's life.

Marked `slurm` (excluded by default): `python -m pytest -m slurm tests/slurm`.
"""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest

from sessions import Site, service_topology
from support import zpipe
from test_sessions import free_port, truth_sum

pytestmark = [pytest.mark.slurm]


def listed(registry: str) -> dict:
    res = zpipe("sessions", "--registry", registry, "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_for(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:g} s")


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
        left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(topo) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes left behind: {left}"


@pytest.mark.timeout(420)
def test_a_session_job_joins_streams_two_scans_exactly_and_leaves_cleanly_on_scancel(site, slurm, tmp_path):
    site.start("servers", "servers")
    site.wait_alive("producer", 4)
    site.wait_alive("aggregator", 1)

    res = zpipe("submit", str(site.topology), "--time", "10", "--output-dir", str(site.out("compute")),
                "--log", str(tmp_path / "job-%j.out"), cwd=tmp_path, env=slurm.env, timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    assert job.isdigit(), res.stdout
    site.jobs.append(job)
    joblog = tmp_path / f"job-{job}.out"
    t0 = time.monotonic()
    site.wait_alive("nodegroup", 2, timeout=90)
    joined = time.monotonic() - t0
    (s,) = listed(site.registry)["sessions"]
    assert s["id"] == job and s["job"] == job and s["state"] == "running", s
    assert s["replicas"] == {"nodegroup[0]": "alive", "nodegroup[1]": "alive"} and s["nodelist"] == slurm.node, s

    # Two acquisitions stream to the job's node groups, exactly.
    for n in (1, 2):
        scan, line, rc = site.acquire("--shape", "16x16")
        assert rc == 0 and scan == n and f"scan {n} complete" in line, line
        r = site.report(n)
        assert r["expected"] == r["received"] == 1024 and r["complete"] == 256 and r["ok"], r
        assert r["analyses"]["framesum"]["sum"] == truth_sum(n)[1]
        assert r["lost_parts"] == 0 and not r["missing_parts"]

    # scancel: every task is signalled; the node groups leave (finish, hand back, deregister) and the job ends.
    t1 = time.monotonic()
    res = slurm.run("scancel", job)
    assert res.returncode == 0, res.stderr
    during = wait_for(lambda: (lambda d: d if d["sessions"] and d["sessions"][0]["state"] != "running" else None)(
        listed(site.registry)), 30, "the session did not begin to leave")
    wait_for(lambda: slurm.job_state(job) not in ("RUNNING", "COMPLETING"), 60, "the job did not end")
    ended_in = time.monotonic() - t1
    state = slurm.job_state(job)
    (s,) = listed(site.registry)["sessions"]
    assert s["state"] == "ended" and s["replicas"] == {"nodegroup[0]": "left", "nodegroup[1]": "left"}, s
    text = joblog.read_text(errors="replace")
    assert text.count("leaving (SIGTERM)") == 2, text
    assert "did not end within" not in text and "killing it" not in text and "Killed" not in text, text
    assert ended_in < 30, f"the job took {ended_in:.1f} s to end after scancel (Slurm kills at KillWait=30 s)"

    # No session any more: the next acquisition goes to disk.
    scan, line, rc = site.acquire("--shape", "16x16")
    assert rc == 0 and scan == 3 and "no node group; 1,024 of 1,024 messages written to disk" in line, line

    res = zpipe("sessions", "--registry", site.registry, timeout=60)
    assert res.returncode == 0 and job in res.stdout and "nodegroup[0] left, nodegroup[1] left" in res.stdout
    print(f"\njob {job}: node groups alive {joined:.1f} s after sbatch; scans 1, 2 complete 1,024/1,024; "
          f"scancel -> job {state} in {ended_in:.1f} s (session seen {during['sessions'][0]['state']}); "
          f"scan 3 to disk.\n`zpipe sessions`:\n{res.stdout}")
    site.stop("servers")
