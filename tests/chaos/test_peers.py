"""Chaos: peers that die (kill -9), freeze (SIGSTOP) or leave mid-scan, in real processes on real sockets.

Every case states the bound its run must end within, and asserts: no traceback crash, no
replica left running, a report for every scan, and each report's named losses equal to the
ground truth (recomputed from the simulator), or the scan marked failed.
"""

from __future__ import annotations

import random
import signal

import pytest

from chaos_harness import Run, Truth, chaos_topology
from zpipe.topology import load_topology

BOUND = 180.0  # seconds a faulted run of four 24x24 scans may take, start to end, on a loaded 2-core machine
SCAN_MESSAGES = 24 * 24 * 4


def params_of(topology) -> dict:
    return dict(load_topology(topology).nodes["producer"].params)


def check_all(run: Run, params: dict, scans: int, **kw) -> dict[int, dict]:
    reports = run.reports()
    assert sorted(reports) == list(range(1, scans + 1)), f"reports for {sorted(reports)}:\n{run.stdout()}"
    figures = {}
    for scan, r in sorted(reports.items()):
        figures[scan] = Truth(params, scan).check(r, **kw)
    return figures


def no_crash(run: Run, allowed: tuple[str, ...] = ()) -> None:
    err = run.stderr()
    for line in err.splitlines():
        if "Traceback" in line:
            context = err[err.index(line):][:2000]
            assert any(a in context for a in allowed), f"a traceback:\n{context}"


@pytest.mark.chaos
@pytest.mark.timeout(BOUND + 60)
@pytest.mark.parametrize("base", ["4dcamera-local.yaml", "4dcamera-direct.yaml"])
@pytest.mark.parametrize("victim", [0, 1])
def test_killed_node_group_the_survivor_finishes_and_losses_are_exact(tmp_path, base, victim):
    _kill_node_group(tmp_path, base, victim, random.Random().uniform(0.1, 0.8))


@pytest.mark.timeout(BOUND + 60)
def test_killed_node_group_default(tmp_path):
    """The default run's representative: kill -9 of node group 1 half-way through scan 1."""
    _kill_node_group(tmp_path, "4dcamera-local.yaml", 1, 0.5)


def _kill_node_group(tmp_path, base: str, victim: int, fraction: float) -> None:
    topo = chaos_topology(tmp_path, base=base, scans=4)
    params = params_of(topo)
    run = Run(topo, tmp_path / "out").start()
    try:
        run.at_fraction(1, fraction, SCAN_MESSAGES)
        run.signal("nodegroup", victim, signal.SIGKILL)
        code = run.finish(BOUND)
        figures = check_all(run, params, 4, dead_share={victim})
        reports = run.reports()
        print(f"kill -9 nodegroup[{victim}] at {fraction:.0%} of scan 1 ({base}): exit {code} in {run.seconds:.1f} s; "
              + "; ".join(f"scan {s}: {f}" for s, f in figures.items()))
        assert code == 3, run.stderr()[-3000:]
        assert f"node nodegroup[{victim}] was killed by signal 9" in run.stderr()
        survivor = f"nodegroup[{1 - victim}]"
        after = [s for s, r in reports.items() if r["node_groups"] == [survivor] and not r["node_groups_lost"]
                 and not r.get("node_groups_idle")]
        assert 4 in after, "the last scan should have gone to the survivor alone"
        for s in after:
            assert reports[s]["outcome"] == "complete", (s, reports[s]["reasons"])
        no_crash(run)
    finally:
        run.close()
    assert not run.left_behind, f"replicas left running: {run.left_behind}"
