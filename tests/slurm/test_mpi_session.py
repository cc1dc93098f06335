"""Sessions whose node groups gather with MPI (issue 13, acceptances 3 and 4): under `srun --mpi=pmi2` a job's
tasks are one MPI world and write one HDF5 file per scan, the same as a session without MPI writes; tasks that
cannot form one world (srun without --mpi=pmi2) fail at once, saying so.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from slurm_site import listed, scancel, submit, wait_for
from support import zpipe

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

VARYING = {"scan"}  # attributes that name the scan's number; the rest must be equal


def contents(path) -> dict:
    """Every dataset's values and every attribute of an HDF5 file, but the scan's number and its report (times)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as h:
        out["/"] = dict(h.attrs)

        def visit(name, obj):
            if name == "metadata/zpipe/report":
                return
            out[name + "@"] = {k: v for k, v in obj.attrs.items() if k not in VARYING}
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                out[name] = [np.asarray(x).tolist() for x in value] if value.dtype == object else value.tolist()

        h.visititems(visit)
    return out


def run_scans(site, first: int, seed: int) -> list[int]:
    """Two acquisitions, scans `first` and `first + 1`; the simulator's seed set so that they are the same data
    as scans 1 and 2 with seed 10 (its data depend on seed + scan number)."""
    done = []
    for n in (first, first + 1):
        scan, line, rc = site.acquire("--shape", "16x16", "--set", f"seed={seed}")
        assert rc == 0 and scan == n and f"scan {n} complete" in line, line
        r = site.report(n)
        assert r["expected"] == r["received"] == 1024 and r["complete"] == 256 and r["ok"], r
        done.append(n)
    return done


@pytest.mark.timeout(600)
def test_mpi_gathering_under_srun_pmi2_writes_the_files_a_plain_session_writes(site, slurm):
    site.start("servers", "servers")
    site.wait_alive("producer", 4)
    site.wait_alive("aggregator", 1)

    plain, plain_log = submit(site, slurm, "--mpi", "none", out="plain")
    site.wait_alive("nodegroup", 2, timeout=90)
    run_scans(site, 1, seed=10)
    # A second session of the same replica numbers is refused while the first runs, by every rank, at once.
    twin, twin_log = submit(site, slurm, "--mpi", "pmi2", out="twin")
    wait_for(lambda: slurm.job_state(twin) not in ("PENDING", "RUNNING", "COMPLETING"), 90, "the twin did not end")
    text = twin_log.read_text(errors="replace")
    assert slurm.job_state(twin) == "FAILED" and "is already running in this pipeline" in text, text
    assert listed(site.registry)["sessions"][0]["id"] == plain  # the twin never joined
    refused = next(line for line in text.splitlines() if "already running" in line)
    scancel(site, slurm, plain)

    t0 = time.monotonic()
    mpi, mpi_log = submit(site, slurm, "--mpi", "pmi2", out="mpi")
    site.wait_alive("nodegroup", 2, timeout=90)
    joined = time.monotonic() - t0
    # Each rank's first line reaches the job's log through srun in its own time: wait for both (bounded).
    ranks = ("nodegroup[0] as MPI rank 0 of 2", "nodegroup[1] as MPI rank 1 of 2")
    wait_for(lambda: all(r in mpi_log.read_text(errors="replace") for r in ranks), 30, "both ranks' first lines")
    text = mpi_log.read_text(errors="replace")
    assert all(r in text for r in ranks), text
    run_scans(site, 3, seed=8)

    same = []
    for a, b in ((1, 3), (2, 4)):
        files = sorted(p.name for p in site.out("mpi").glob(f"scan_{b}_*.h5"))
        assert files == [f"scan_{b}_electrons.h5"], files  # one file per scan, written on the scan's first rank
        x, y = contents(site.out("plain") / f"scan_{a}_electrons.h5"), contents(site.out("mpi") / files[0])
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == y[k] if not isinstance(x[k], dict) else _same_attrs(x[k], y[k]), k
        same.append(f"scan {a} (plain) == scan {b} (MPI): {len(x)} entries")
    ended_in = scancel(site, slurm, mpi)
    (s_mpi, s_plain) = listed(site.registry)["sessions"]  # newest first
    assert s_mpi["id"] == mpi and s_mpi["state"] == "ended" and s_plain["id"] == plain and s_plain["state"] == "ended"
    text = mpi_log.read_text(errors="replace")
    assert text.count("leaving (SIGTERM)") == 2 and "Killed" not in text, text
    print(f"\nplain job {plain}, MPI job {mpi} (srun --mpi=pmi2, ranks joined in {joined:.1f} s): "
          f"{'; '.join(same)}; scancel -> ended in {ended_in:.1f} s; a twin job {twin} FAILED: {refused}")
    site.stop("servers")


def _same_attrs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(180)
def test_tasks_that_are_not_one_mpi_world_fail_at_once_naming_the_fix(tmp_path, slurm):
    from sessions import service_topology
    from test_sessions import free_port

    topo = service_topology(tmp_path / "services.yaml", port=free_port(),
                            hosts={"servers": "127.0.0.1", "compute": "127.0.0.1"})
    # A user's own script that asks zpipe for MPI but starts the tasks with srun's default (MpiDefault=none).
    mine = tmp_path / "mine.sh.j2"
    mine.write_text("#!/bin/bash\n#SBATCH --nodes={{ nodes }}\n#SBATCH --ntasks-per-node={{ ntasks_per_node }}\n"
                    "#SBATCH --output={{ log }}\n"
                    "srun {{ zpipe }} run {{ topology | quote }} --host {{ host }} --node {{ node }} --replica rank "
                    "--mpi --output-dir {{ output_dir | quote }}\n")
    t0 = time.monotonic()
    res = zpipe("submit", str(topo), "--template", str(mine), "--log", str(tmp_path / "job-%j.out"),
                "--output-dir", str(tmp_path / "out"), cwd=tmp_path, env=slurm.env)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    try:
        wait_for(lambda: slurm.job_state(job) not in ("PENDING", "RUNNING", "COMPLETING"), 120, "the job did not end")
    finally:
        slurm.run("scancel", job)
    took = time.monotonic() - t0
    state = slurm.job_state(job)
    text = (tmp_path / f"job-{job}.out").read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("zpipe run --mpi:")]
    assert len(lines) == 2, text  # one per task
    assert all("did not form one MPI world" in line and "srun --mpi=pmi2" in line for line in lines), text
    assert state == "FAILED" and took < 60, (state, took)
    print(f"\njob {job}: {state} {took:.1f} s after submission; {lines[0]}")
