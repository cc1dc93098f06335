"""How a session's batch script is submitted: a Submitter turns a script into a job id.

`SbatchSubmitter` (`sbatch --parsable`, the script on its stdin) is built in. A facility plugs in
its own (an HTTP API in front of Slurm, say) as a class registered under the entry point group
`zpipe.submitters`, in its distribution's pyproject.toml:

    [project.entry-points."zpipe.submitters"]
    superfacility = "mypkg.submit:SuperfacilitySubmitter"

and chooses it with `zpipe submit --submitter superfacility`. The class is made without
arguments; its `submit(script, workdir=...)` returns the job id or raises SubmitError with a
one-line reason.
"""

from __future__ import annotations

import abc
import shutil
import subprocess

GROUP = "zpipe.submitters"


class SubmitError(Exception):
    """A submission that failed: one line saying why."""


class Submitter(abc.ABC):
    """Submits a batch script; returns the job's id."""

    @abc.abstractmethod
    def submit(self, script: str, *, workdir: str | None = None) -> str:
        ...


class SbatchSubmitter(Submitter):
    """`sbatch --parsable`, the script on stdin, run in `workdir` (where Slurm writes the job's output)."""

    def __init__(self, command: tuple[str, ...] = ("sbatch", "--parsable"), timeout: float = 60.0):
        self.command, self.timeout = tuple(command), timeout

    def submit(self, script: str, *, workdir: str | None = None) -> str:
        if shutil.which(self.command[0]) is None:
            raise SubmitError(f"{self.command[0]} is not on PATH: is this a Slurm login node? (--dry-run prints "
                              f"the script; --submitter chooses another way to submit)")
        try:
            res = subprocess.run(self.command, input=script, capture_output=True, text=True, cwd=workdir,
                                 timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise SubmitError(f"{' '.join(self.command)} did not answer within {self.timeout:g} s") from None
        if res.returncode != 0:
            why = " ".join(res.stderr.split()) or f"exit code {res.returncode}"
            raise SubmitError(f"{' '.join(self.command)} refused the job: {why}")
        # --parsable: "jobid" or "jobid;cluster"
        job = res.stdout.strip().splitlines()[-1].split(";")[0].strip() if res.stdout.strip() else ""
        if not job.isdigit():
            raise SubmitError(f"{' '.join(self.command)} printed no job id: {res.stdout.strip()!r}")
        return job


BUILTIN = {"sbatch": SbatchSubmitter}


def find_submitter(name: str) -> Submitter:
    """The submitter registered as `name` (entry point group zpipe.submitters; `sbatch` is built in)."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name in found:
        try:
            cls = found[name].load()
        except Exception as exc:
            raise SubmitError(f"--submitter {name}: {found[name].value} cannot be loaded: "
                              f"{type(exc).__name__}: {exc}") from None
    elif name in BUILTIN:
        cls = BUILTIN[name]
    else:
        known = ", ".join(sorted(set(found) | set(BUILTIN)))
        raise SubmitError(f"--submitter {name}: no such submitter (entry point group {GROUP}); known: {known}")
    try:
        sub = cls()
    except Exception as exc:
        raise SubmitError(f"--submitter {name}: cannot make it: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(sub, "submit", None)):
        raise SubmitError(f"--submitter {name}: {cls!r} has no submit(script) method")
    return sub
