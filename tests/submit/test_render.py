"""`zpipe submit`: the batch script rendered from the default template (golden files), a user's template,
errors in one line, and submission through sbatch (a stand-in on PATH) or a submitter plugged in by entry point.

UPDATE_GOLDEN=1 rewrites the golden files from what is rendered now (then review the diff).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from sessions import service_topology
from support import zpipe

GOLDEN = Path(__file__).resolve().parent / "golden"
PORT = 5599  # only written into the topology: nothing is started


@pytest.fixture
def topo(tmp_path) -> Path:
    return service_topology(tmp_path / "services.yaml", port=PORT, hosts={"servers": "127.0.0.1", "compute": "127.0.0.1"})


def normal(text: str, tmp_path: Path) -> str:
    """The script with this run's paths named, so that it compares across machines."""
    return text.replace(sys.executable, "{python}").replace(str(tmp_path), "{tmp}")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"the script differs from {path} (UPDATE_GOLDEN=1 to rewrite it)"


def test_default_options(topo, tmp_path):
    res = zpipe("submit", str(topo), "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    check_golden("default.sh", normal(res.stdout, tmp_path))
    # What a session needs: one node group per srun task, numbered by rank, warned before the end.
    assert "#SBATCH --signal=TERM@60\n" in res.stdout
    assert "--replica rank " in res.stdout and "srun --mpi=none " in res.stdout
    assert f"--output-dir {tmp_path} " in res.stdout or res.stdout.rstrip().endswith(str(tmp_path))


def test_every_option(topo, tmp_path):
    res = zpipe("submit", str(topo), "--dry-run", "--nodes", "2", "--ntasks-per-node", "1", "--time", "1-02:30:00",
                "--partition", "debug", "--account", "m1234", "--sbatch-line=--constraint=cpu",
                "--sbatch-line", "#SBATCH --mail-type=END", "--mpi", "pmi2", "--host", "compute", "--node",
                "nodegroup", "--signal", "B:INT@120", "--job-name", "scan-session", "--output-dir",
                str(tmp_path / "out"), "--registry", f"tcp://127.0.0.1:{PORT}", "--log",
                str(tmp_path / "session-%j.out"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    check_golden("every_option.sh", normal(res.stdout, tmp_path))


@pytest.mark.parametrize("value, seconds", [("30", 1800), ("0:45", 45), ("2:00:00", 7200), ("1-12", 129600),
                                            ("1-0:30", 88200), ("1-0:0:5", 86405), ("UNLIMITED", None)])
def test_time_formats(value, seconds):
    from zpipe.submit import time_seconds

    assert time_seconds(value) == seconds


def test_a_users_template(topo, tmp_path):
    mine = tmp_path / "mine.sh.j2"
    mine.write_text("#!/bin/sh\n#SBATCH -N {{ nodes }} -n {{ ntasks }}{% for l in sbatch_lines %}\n#SBATCH {{ l }}"
                    "{% endfor %}\nsrun {{ zpipe }} run {{ topology | quote }} --host {{ host }} --node {{ node }} "
                    "--replica rank\n")
    res = zpipe("submit", str(topo), "--dry-run", "--template", str(mine), "-N", "1", "--ntasks-per-node", "2",
                "--sbatch-line=--qos=realtime", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    check_golden("user_template.sh", normal(res.stdout, tmp_path))


def test_an_undefined_variable_is_one_line_naming_it_and_the_template(topo, tmp_path):
    mine = tmp_path / "typo.sh.j2"
    mine.write_text("#!/bin/sh\n#SBATCH -N {{ nodes }}\nsrun zpipe run {{ topolgy }}\n")
    res = zpipe("submit", str(topo), "--dry-run", "--template", str(mine), cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"zpipe submit: {mine}:3: undefined variable 'topolgy' (the variables are: "), lines[0]


def test_a_template_syntax_error_and_a_missing_template(topo, tmp_path):
    bad = tmp_path / "bad.sh.j2"
    bad.write_text("#!/bin/sh\n{% if nodes %}\n")
    res = zpipe("submit", str(topo), "--dry-run", "--template", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{bad}:2: template syntax error" in res.stderr, res.stderr
    res = zpipe("submit", str(topo), "--dry-run", "--template", str(tmp_path / "nope.j2"), cwd=tmp_path)
    assert res.returncode == 2 and "cannot read it" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--nodes", "two"], "--nodes 'two': expected a whole number"),
    (["--ntasks-per-node", "-1"], "--ntasks-per-node -1: must be at least 1"),
    (["--ntasks-per-node", "3"], "1 node x 3 node groups per node = 3 tasks, but 'nodegroup' has 2 replicas"),
    (["--nodes", "2"], "2 nodes x 2 node groups per node = 4 tasks"),
    (["--time", "1:2:3:4"], "--time '1:2:3:4': not a Slurm time limit"),
    (["--time", "0"], "--time '0': a job needs some time"),
    (["--time", "1", "--signal", "TERM@60"], "the warning (60 s before the end) would come before the job starts"),
    (["--signal", "KILL@60"], "node groups leave gracefully on TERM or INT, not KILL"),
    (["--signal", "TERM@"], "expected [B:]SIGNAL[@SECONDS]"),
    (["--partition", "a b"], "--partition 'a b': letters, digits"),
    (["--account", "x\n#SBATCH --exclusive"], "--account"),
    (["--sbatch-line", "exclusive"], "--sbatch-line 'exclusive': one sbatch option"),
    (["--sbatch-line=--a\n--b"], "one sbatch option"),
    (["--host", "servers"], "--host 'servers': node 'nodegroup' is placed on host 'compute'"),
    (["--host", "nowhere"], "--host 'nowhere' is not in the topology's hosts"),
    (["--node", "aggregator"], "--node 'aggregator' is a aggregator, not a nodegroup"),
    (["--node", "ghost"], "--node 'ghost' is not a node of the topology"),
    (["--registry", "localhost:5555"], "--registry 'localhost:5555': expected tcp://HOST:PORT"),
])
def test_bad_option_values_are_one_line(topo, tmp_path, args, message, capsys, monkeypatch):
    from zpipe.cli import parser

    monkeypatch.chdir(tmp_path)
    parsed = parser().parse_args(["submit", str(topo), "--dry-run", *args])
    code = parsed.func(parsed)  # in process: the command's own code, without a process start per case
    out, err = capsys.readouterr()
    assert code == 2 and out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zpipe submit: ") and message in lines[0], err


def test_bad_choice_of_mpi_and_a_topology_with_problems(topo, tmp_path):
    res = zpipe("submit", str(topo), "--dry-run", "--mpi", "pmix", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice: 'pmix'" in res.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(topo.read_text().replace("role: aggregator", "role: aggregater"))
    res = zpipe("submit", str(broken), "--dry-run", cwd=tmp_path)
    assert res.returncode == 1 and "nothing submitted" in res.stderr and res.stdout == ""


def test_a_registry_the_compute_nodes_cannot_know(tmp_path):
    topo = service_topology(tmp_path / "services.yaml", port=0, hosts={"servers": "127.0.0.1", "compute": "127.0.0.1"})
    res = zpipe("submit", str(topo), "--dry-run", cwd=tmp_path)
    assert res.returncode == 2 and "cannot find the registry" in res.stderr and "registry.port" in res.stderr
    res = zpipe("submit", str(topo), "--dry-run", "--registry", "tcp://127.0.0.1:5600", cwd=tmp_path)
    assert res.returncode == 0 and "--registry tcp://127.0.0.1:5600" in res.stdout, res.stderr


def fake_sbatch(where: Path, answer: str, code: int = 0) -> dict:
    """An `sbatch` on PATH that keeps the script it was given and answers like `sbatch --parsable`."""
    where.mkdir(exist_ok=True)
    exe = where / "sbatch"
    exe.write_text(f"#!/bin/sh\ncat > {where}/submitted.sh\necho \"$@\" > {where}/args\n"
                   f"echo '{answer}'\n" + (f"echo 'sbatch: error: Batch job submission failed' >&2\nexit {code}\n"
                                            if code else ""))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{where}{os.pathsep}{os.environ['PATH']}"}


def test_submitted_with_sbatch_prints_the_job_id(topo, tmp_path):
    bin_ = tmp_path / "bin"
    res = zpipe("submit", str(topo), "--time", "10", cwd=tmp_path, env=fake_sbatch(bin_, "4242;cluster"))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "4242\n"
    assert (bin_ / "args").read_text().split() == ["--parsable"]
    dry = zpipe("submit", str(topo), "--time", "10", "--dry-run", cwd=tmp_path)
    assert (bin_ / "submitted.sh").read_text() == dry.stdout
    res = zpipe("submit", str(topo), cwd=tmp_path, env=fake_sbatch(bin_, "", code=1))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == ("zpipe submit: sbatch --parsable refused the job: sbatch: error: Batch job "
                                  "submission failed"), res.stderr
    res = zpipe("submit", str(topo), cwd=tmp_path, env={"PATH": str(tmp_path / "empty")})
    assert res.returncode == 1 and "sbatch is not on PATH" in res.stderr


def test_a_submitter_plugged_in_by_entry_point(topo, tmp_path):
    site = tmp_path / "site"
    info = site / "facility_submit-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: facility-submit\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[zpipe.submitters]\nfacility = facility_submit:Api\n")
    (site / "facility_submit.py").write_text(
        "import pathlib\nfrom zpipe.submit import Submitter\n"
        "class Api(Submitter):\n"
        "    def submit(self, script, *, workdir=None):\n"
        f"        pathlib.Path({str(tmp_path / 'posted.sh')!r}).write_text(script)\n"
        "        return 'api-77'\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    res = zpipe("submit", str(topo), "--submitter", "facility", cwd=tmp_path, env=env)
    assert res.returncode == 0 and res.stdout == "api-77\n", res.stderr
    assert (tmp_path / "posted.sh").read_text().startswith("#!/bin/bash\n")
    res = zpipe("submit", str(topo), "--submitter", "nope", cwd=tmp_path, env=env)
    assert res.returncode == 1 and "no such submitter" in res.stderr and "facility, sbatch" in res.stderr
