"""Chaos: the registry goes away for longer than a scan (kill -9 of a stand-alone `zpipe kv`), and comes back or not.

The data plane needs no registry while a scan streams (scans are counted in band), so scans go
on; what the registry would have gathered for the account, every party also kept on its own
disk. Either way every scan must end with an account equal to the ground truth, or be reported
failed, never missing, and the run must end within its bound.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from chaos_harness import Run, Truth, chaos_topology, params_of

BOUND = 200.0
DOWN = 15.0  # seconds the registry is away: longer than a scan of this topology takes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(BOUND + 60)
# comes-back ~24 s, under slow: the default run stays near 10 min (tests/kv restarts the server in it)
@pytest.mark.parametrize("back", [pytest.param(True, marks=pytest.mark.slow), pytest.param(False, marks=pytest.mark.chaos)],
                         ids=["comes-back", "stays-away"])
def test_registry_down_longer_than_a_scan(tmp_path, back):
    address = f"tcp://127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []

    def registry() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "zpipe", "kv", "--bind", address, "--output-dir",
                                 str(tmp_path / "registry")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(proc)
        assert proc.stdout.readline().startswith("zpipe kv: serving at"), "the registry did not start"
        return proc

    kv = registry()
    topo = chaos_topology(tmp_path, scans=4)
    params = params_of(topo)
    run = Run(topo, tmp_path / "out", args=("--registry", address)).start()
    try:
        run.at_fraction(1, 0.3, 24 * 24 * 4)
        kv.kill()
        kv.wait(10)
        if back:
            time.sleep(DOWN)
            registry()
        code = run.finish(BOUND)
        reports = run.reports()
        assert sorted(reports) == [1, 2, 3, 4], run.stdout()  # none missing, whatever the registry forgot
        outcomes = {}
        for scan, r in sorted(reports.items()):
            outcomes[scan] = Truth(params, scan).check(r)["outcome"]
        print(f"registry away {'for %.0f s' % DOWN if back else 'for good'} from 30 % of scan 1: exit {code} "
              f"in {run.seconds:.1f} s; outcomes {outcomes}")
        assert code == (4 if "failed" in outcomes.values() else 3 if "incomplete" in outcomes.values() else 0)
        assert "Traceback" not in run.stderr()
    finally:
        run.close()
        for proc in procs:
            proc.kill()
            proc.wait(10)
    assert not run.left_behind
