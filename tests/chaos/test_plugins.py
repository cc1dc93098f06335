"""Chaos: an analysis that raises in any of its hooks is named, its scan marked failed, and nothing hangs.

A third-party analysis (installed as a real distribution, found through its entry point) raises
in one hook; framesum runs beside it. Each run must end within its bound with a report per scan:
the faulty analysis marked failed (hook, scan, error), framesum's figures still exact (the
ground truth), the traceback printed once, and the exit code saying a scan failed.
"""

from __future__ import annotations

import pytest

from chaos_harness import Run, Truth, chaos_topology, params_of
from support import third_party

BOUND = 120.0

BOMB = '''
from zpipe.plugin import Analysis, Params

class Bomb(Analysis):
    class Params(Params):
        hook: str = "process"
        scan: int = 2

    def _maybe(self, hook, scan_id=None):
        if hook == self.params.hook and (scan_id is None or scan_id == self.params.scan):
            raise RuntimeError(f"bomb in {hook}")

    def setup(self, ctx):
        self._maybe("setup")

    def begin(self, scan):
        self._maybe("begin", scan.id)
        self.n = 0

    def process(self, batch):
        self.n += len(batch)
        self._maybe("process", batch.scan.id)

    def finish(self, scan):
        self._maybe("finish", scan.id)
        return {"items": self.n}

    def results(self, scan):
        self._maybe("results", scan.id)
        return {"items": self.n}

    @classmethod
    def write(cls, scan, parts, report, output_dir):
        if scan.id == 2:
            raise RuntimeError("bomb in write")
        return None
'''


@pytest.fixture
def bomb(tmp_path):
    return third_party(tmp_path / "site", "bomb", "1.0", {"bomb": "bomb_zp:Bomb"}, {"bomb_zp": BOMB})


@pytest.mark.timeout(BOUND + 60)
@pytest.mark.parametrize("hook", ["setup", "begin", "process", "finish", "results", "write"])
def test_an_analysis_failing_in_a_hook_is_named_and_the_rest_is_kept(tmp_path, bomb, hook):
    topo = chaos_topology(tmp_path, scans=3, side=16, delay=0.0, extra=(
        ("      - plugin: discard\n        params: {delay: 0.0}",
         f"      - plugin: bomb\n        params: {{hook: {hook}, scan: 2}}"),))
    params = params_of(topo)
    run = Run(topo, tmp_path / "out", env=bomb).start()
    try:
        code = run.finish(BOUND)
        reports = run.reports()
        assert sorted(reports) == [1, 2, 3], run.stdout()
        failing = {1, 2, 3} if hook == "setup" else {2}
        for scan, r in reports.items():
            Truth(params, scan).check({**r, "outcome": "incomplete"})  # framesum exact whatever the bomb did
            bomb_figures = r["analyses"].get("bomb", {})
            if scan in failing:
                assert r["outcome"] == "failed", (scan, r["reasons"])
                text = " ".join(r["reasons"])
                if hook == "write":
                    assert "'bomb': its output could not be written: RuntimeError: bomb in write" in text
                else:
                    assert f"analysis 'bomb' failed in {hook}" in text and "RuntimeError: bomb in " + hook in text
                    assert all(f["scan"] in (scan, None) for f in bomb_figures["failed"])
            else:
                assert r["outcome"] == "complete", (scan, r["reasons"])
                assert bomb_figures.get("items") == 256
        assert code == 4, run.stderr()[-2000:]
        err = run.stderr()
        assert err.count(f"RuntimeError: bomb in {hook}") >= 1
        if hook != "setup":  # once per node group that met it; setup fails once per worker set made
            assert err.count(f"analysis 'bomb' failed in {hook}") <= 2 if hook != "write" else True
        print(f"bomb in {hook}: exit {code} in {run.seconds:.1f} s; outcomes "
              f"{ {s: r['outcome'] for s, r in sorted(reports.items())} }")
    finally:
        run.close()
    assert not run.left_behind
