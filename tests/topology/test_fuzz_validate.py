"""`zpipe validate` on malformed topologies: it returns in bounded time, never raises, and either
accepts the file or reports positioned problems (FILE:LINE:COL: path: message); what it accepts
can start.

The cases come from tests/topology/malformed.py (seeded, deterministic). The default run takes
a representative subset; `pytest -m chaos tests/topology/test_fuzz_validate.py -s` takes every
case, starts every accepted one with `zpipe run`, and prints the figures.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import zpipe
from zpipe.topology.load import check_file

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("zpipe_test_malformed", HERE / "malformed.py")
malformed = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = malformed
_spec.loader.exec_module(malformed)

LIMIT = 10.0  # seconds one case may take to validate
RUN_FOR = 8.0  # seconds an accepted case runs before it is interrupted
SUMMARY = re.compile(r".*: \d+ problems?$")

# The default run: the inputs that once gave a traceback or a hang, a few that cannot run,
# and the first mutations of the real topologies.
HAND = ["invalid-utf8", "control-char", "merge-key", "recursive-alias", "deep-flow-5000", "big-int-5000-digits",
        "int-node-name", "null-node-name", "list-node-name", "alias-bomb", "oversized-file", "node-name-with-dot",
        "aggregator-replicas-2", "dtype-junk"]
FIRST_MUTATIONS = 16
CLI_SAMPLE = ["invalid-utf8", "control-char", "alias-bomb", "deep-flow-5000", "big-int-5000-digits", "recursive-alias",
              "list-node-name", "lone-surrogate-escape", "utf8-bom"]
STARTS_IN_DEFAULT_RUN = "hand-utf8-bom"


def subset() -> list:
    hand = {c.id: c for c in malformed.hand_written()}
    return [hand[f"hand-{name}"] for name in HAND] + malformed.mutations(malformed.SEED, FIRST_MUTATIONS)


class CaseTimeout(Exception):
    pass


@dataclass
class Outcome:
    case: object
    seconds: float = 0.0
    problems: list = field(default_factory=list)
    topology: object = None
    error: str | None = None  # what was wrong with the outcome itself


def validate(case, where: Path) -> Outcome:
    """check_file on the case, stopped by SIGALRM after LIMIT seconds (pytest-timeout's alarm is kept)."""
    path = where / "case.yaml"
    path.write_bytes(case.data)
    out = Outcome(case)

    def alarm(signum, frame):
        raise CaseTimeout(f"still validating after {LIMIT:g} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, LIMIT)
    t0 = time.monotonic()
    try:
        out.topology, out.problems = check_file(path)
    except BaseException as exc:  # noqa: B036 - a timeout or a bug: both are the finding
        out.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        out.seconds = time.monotonic() - t0
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - out.seconds, 0.001), old_interval)
    if out.error is None:
        out.error = _judge(out, str(path), case.data)
    return out


def _judge(out: Outcome, path: str, data: bytes) -> str | None:
    """None if the outcome is well formed: accepted with no problems, or rejected with positioned ones."""
    if out.seconds > LIMIT:
        return f"took {out.seconds:.1f} s"
    if (out.topology is None) != bool(out.problems):
        return f"topology {'missing' if out.topology is None else 'returned'} with {len(out.problems)} problems"
    lines = data.count(b"\n") + 1
    where = re.compile(re.escape(path) + r":(\d+):(\d+): \S")
    for p in out.problems:
        text = str(p)
        if not where.match(text) or "\n" in text or "Traceback" in text or not p.message.strip():
            return f"not a positioned one-line problem: {text[:300]!r}"
        if not (1 <= p.line <= lines and p.column >= 1):
            return f"position {p.line}:{p.column} outside the file ({lines} lines): {text[:200]!r}"
    return None


def run_briefly(case, topology, seconds: float = RUN_FOR) -> tuple[bool, str]:
    """`zpipe run` the case for `seconds`, then Ctrl-C; (started without a failure, the output)."""
    work = tempfile.mkdtemp(prefix="zpf", dir="/tmp")  # short: ipc socket paths live here
    try:
        path = os.path.join(work, "case.yaml")
        with open(path, "wb") as f:
            f.write(case.data)
        cmd = [sys.executable, "-m", "zpipe", "run", path, "--output-dir", work]
        if len(topology.hosts_used()) > 1:
            cmd += ["--host", topology.registry_host()]  # the host that starts the registry
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
        text = output.decode("utf-8", "replace")
        failed = "Traceback" in text or "failed with exit code" in text
        return not failed, f"exit {proc.returncode}\n{text}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cli_validate(files: list[Path], timeout: float = 120) -> list[str]:
    """Run the real `zpipe validate` on the files; what was wrong with its output, if anything."""
    res = zpipe("validate", *map(str, files), timeout=timeout)
    wrong = []
    both = res.stdout + res.stderr
    if "Traceback" in both:
        wrong.append("Traceback in the output:\n" + both[-3000:])
    if res.returncode not in (0, 1):
        wrong.append(f"exit code {res.returncode}")
    for line in res.stderr.splitlines():
        if not (re.match(r".+:\d+:\d+: \S", line) or SUMMARY.match(line)):
            wrong.append(f"stderr line is neither a positioned problem nor a summary: {line[:200]!r}")
    for f in files:
        ok = f"{f}: ok" in res.stdout.splitlines()
        bad = any(line.startswith(f"{f}:") and SUMMARY.match(line) for line in res.stderr.splitlines())
        if ok == bad:
            wrong.append(f"{f}: {'both ok and problems' if ok else 'neither ok nor problems'}")
    return wrong


# -- the default run: a representative subset ------------------------------------------------------

@pytest.mark.parametrize("case", subset(), ids=lambda c: c.id)
def test_case_validates_in_time_with_positioned_problems(case, tmp_path):
    out = validate(case, tmp_path)
    assert out.error is None, out.error


def test_cases_through_the_command(tmp_path):
    hand = {c.id: c for c in malformed.hand_written()}
    files = []
    for i, name in enumerate(CLI_SAMPLE):
        f = tmp_path / f"{i:02d}-{name}.yaml"
        f.write_bytes(hand[f"hand-{name}"].data)
        files.append(f)
    first = malformed.mutations(malformed.SEED, 1)[0]
    (tmp_path / "mutation.yaml").write_bytes(first.data)
    files.append(tmp_path / "mutation.yaml")
    assert cli_validate(files) == []


def test_one_accepted_case_starts(tmp_path):
    case = next(c for c in malformed.hand_written() if c.id == STARTS_IN_DEFAULT_RUN)
    out = validate(case, tmp_path)
    assert out.error is None and not out.problems, out.problems
    ok, output = run_briefly(case, out.topology)
    assert ok, output


def test_generator_is_deterministic():
    a, b = malformed.mutations(malformed.SEED, 12), malformed.mutations(malformed.SEED, 12)
    assert [c.data for c in a] == [c.data for c in b]
    assert len({c.data for c in a}) == len(a)


# -- the chaos run: every case, and every accepted case started -------------------------------------

def _all_outcomes(tmp_path) -> list[Outcome]:
    return [validate(case, tmp_path) for case in malformed.cases()]


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_chaos_every_case_validates(tmp_path, capsys):
    cases = malformed.cases()
    assert len(cases) >= 200
    outcomes = [validate(case, tmp_path) for case in cases]
    bad = [f"{o.case.id}: {o.error}" for o in outcomes if o.error]
    slowest = max(outcomes, key=lambda o: o.seconds)
    accepted = sum(1 for o in outcomes if o.topology is not None)
    # All of them through the real command too, a hundred files at a time.
    files = []
    for i, case in enumerate(cases):
        f = tmp_path / f"{i:03d}.yaml"
        f.write_bytes(case.data)
        files.append(f)
    cli_wrong = [w for k in range(0, len(files), 100) for w in cli_validate(files[k:k + 100], timeout=600)]
    with capsys.disabled():
        print(f"\nchaos validate: {len(cases)} cases ({len(malformed.hand_written())} hand-written, "
              f"{len(cases) - len(malformed.hand_written())} mutations; digest {malformed.digest(cases)}), "
              f"{accepted} accepted, {len(cases) - accepted} rejected, "
              f"{sum(1 for o in outcomes if o.error)} tracebacks or malformed outcomes, "
              f"slowest {slowest.seconds:.2f} s ({slowest.case.id}); "
              f"through `zpipe validate`: {len(cli_wrong)} wrong")
    assert not bad, "\n".join(bad)
    assert not cli_wrong, "\n".join(cli_wrong)


@pytest.mark.chaos
@pytest.mark.timeout(7200)
def test_chaos_accepted_cases_start(tmp_path, capsys):
    outcomes = _all_outcomes(tmp_path)
    accepted = [o for o in outcomes if o.topology is not None and o.error is None]
    failed = []
    t0 = time.monotonic()
    for o in accepted:
        ok, output = run_briefly(o.case, o.topology)
        if not ok:
            failed.append((o.case.id, output))
    with capsys.disabled():
        print(f"\nchaos start: {len(accepted)} accepted cases run for {RUN_FOR:g} s each "
              f"({time.monotonic() - t0:.0f} s in all): {len(accepted) - len(failed)} started, "
              f"{len(failed)} failed to start" + "".join(f"\n  {cid}" for cid, _ in failed))
    assert not failed, "\n\n".join(f"{cid}:\n{out[-4000:]}" for cid, out in failed)
