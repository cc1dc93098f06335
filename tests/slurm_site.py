"""Session jobs on the private Slurm (tests/private_slurm.py) for the tests in tests/slurm: submit, list, cancel."""

from __future__ import annotations

import json
import time

from support import zpipe


def listed(registry: str) -> dict:
    """`zpipe sessions --json`."""
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


def submit(site, slurm, *args: str, out: str = "compute") -> tuple[str, object]:
    """`zpipe submit` the site's topology to the private Slurm: (job id, its log's path)."""
    res = zpipe("submit", str(site.topology), "--time", "10", "--output-dir", str(site.out(out)),
                "--log", str(site.workdir / "job-%j.out"), *args, cwd=site.workdir, env=slurm.env, timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    assert job.isdigit(), res.stdout
    site.jobs.append(job)
    return job, site.workdir / f"job-{job}.out"


def scancel(site, slurm, job: str) -> float:
    """scancel the job; seconds until Slurm says it ended."""
    t0 = time.monotonic()
    res = slurm.run("scancel", job)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: slurm.job_state(job) not in ("RUNNING", "COMPLETING"), 60, f"job {job} did not end")
    return time.monotonic() - t0
