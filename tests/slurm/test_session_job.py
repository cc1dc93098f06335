"""A session of node groups as a Slurm job (issue 13, acceptance 2): producer services and the aggregator run;
`zpipe submit` starts a job of two node groups; two acquisitions stream exactly; `scancel` ends the job and the
session leaves cleanly; the next acquisition goes to disk; `zpipe sessions` shows the job's life.

Marked `slurm` (excluded by default): `python -m pytest -m slurm tests/slurm`.
"""

from __future__ import annotations

import time

import pytest

from slurm_site import listed, scancel, submit, wait_for
from support import zpipe
from test_sessions import truth_sum

pytestmark = [pytest.mark.slurm]


@pytest.mark.timeout(420)
def test_a_session_job_joins_streams_two_scans_exactly_and_leaves_cleanly_on_scancel(site, slurm, tmp_path):
    site.start("servers", "servers")
    site.wait_alive("producer", 4)
    site.wait_alive("aggregator", 1)

    job, joblog = submit(site, slurm)
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
    ended_in = scancel(site, slurm, job)
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
          f"scancel -> job {state} in {ended_in:.1f} s; "
          f"scan 3 to disk.\n`zpipe sessions`:\n{res.stdout}")
    site.stop("servers")


@pytest.mark.timeout(300)
def test_the_time_limit_warning_ends_a_session_gracefully(site, slurm):
    """--signal TERM@100 with --time 2: Slurm warns the tasks up to 100 s before the limit (its timer has a
    resolution of up to a minute); the node groups leave, the job completes before the limit, scans go to disk."""
    site.start("servers", "servers")
    site.wait_alive("aggregator", 1)
    res = zpipe("submit", str(site.topology), "--time", "2", "--signal", "TERM@100", "--output-dir",
                str(site.out("compute")), "--log", str(site.workdir / "job-%j.out"), cwd=site.workdir, env=slurm.env)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    site.jobs.append(job)
    t0 = time.monotonic()
    site.wait_alive("nodegroup", 2, timeout=90)
    wait_for(lambda: slurm.job_state(job) not in ("PENDING", "RUNNING", "COMPLETING"), 150, "the job did not end")
    took = time.monotonic() - t0
    state = slurm.job_state(job)
    text = (site.workdir / f"job-{job}.out").read_text(errors="replace")
    assert state == "COMPLETED" and took < 115, (state, took, text)
    assert text.count("leaving (SIGTERM)") == 2 and "Killed" not in text, text
    (s,) = listed(site.registry)["sessions"]
    assert s["state"] == "ended" and s["replicas"] == {"nodegroup[0]": "left", "nodegroup[1]": "left"}, s
    scan, line, rc = site.acquire("--shape", "8x8")
    assert rc == 0 and "written to disk" in line, line
    print(f"\njob {job} (--time 2, --signal TERM@100): warned, node groups left, job {state} {took:.0f} s after "
          f"it started; the next scan went to disk")
    site.stop("servers")
