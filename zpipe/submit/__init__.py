"""`zpipe submit TOPOLOGY`: a session of node groups as a batch job, from a Jinja2 template.

The batch script is rendered from a template (the shipped `templates/session.sh.j2`, or a
user's own with --template; a variable the template uses but is not given is an error), then
handed to a submitter: `sbatch --parsable` by default, or any class registered under the entry
point group `zpipe.submitters` (a facility's HTTP API, say), chosen with --submitter NAME.
Every mistake is one line on stderr: exit 2 for options and templates, 1 for a topology with
problems or a submission that failed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal as _signal
import sys
from dataclasses import dataclass
from pathlib import Path

from zpipe.submit.submitters import Submitter, SubmitError, SbatchSubmitter, find_submitter

__all__ = ["Submitter", "SubmitError", "SbatchSubmitter", "find_submitter", "render", "SessionJob", "add_parser"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATE = TEMPLATES / "session.sh.j2"
DEFAULT_SIGNAL = "TERM@60"
MPI_TYPES = ("none", "pmi2")

# Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; or no limit.
_TIME = re.compile(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)")
_SIGNAL = re.compile(r"(?:([RB]{1,2}):)?([A-Za-z0-9]+)(?:@(\d+))?")
_WORD = re.compile(r"[A-Za-z0-9_.,:+@%=/-]+")  # a value that goes into an #SBATCH line as it is


class OptionError(ValueError):
    """An option value that cannot make a batch script: one line, naming the option."""


def time_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit, None for no limit; OptionError if it is not one of Slurm's formats."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.fullmatch(t)
    if not m:
        raise OptionError(f"--time {text!r}: not a Slurm time limit; use minutes (30), hours:minutes:seconds "
                          f"(2:00:00), days-hours[:minutes[:seconds]] (1-12) or minutes:seconds")
    if m[1] is not None:
        d, h, mi, s = (int(x or 0) for x in m.group(1, 2, 3, 4))
    elif m[7] is not None:
        d, h, mi, s = 0, int(m[5]), int(m[6]), int(m[7])
    else:
        d, h, mi, s = 0, 0, int(m[5]), int(m[6] or 0)
    total = ((d * 24 + h) * 60 + mi) * 60 + s
    if total <= 0:
        raise OptionError(f"--time {text!r}: a job needs some time; give more than 0")
    return total


def check_signal(text: str, limit: int | None) -> str:
    """`--signal [R|B:]SIG[@SECONDS]` as sbatch takes it; the node groups leave on TERM or INT."""
    m = _SIGNAL.fullmatch(text.strip())
    if not m:
        raise OptionError(f"--signal {text!r}: expected [B:]SIGNAL[@SECONDS], e.g. {DEFAULT_SIGNAL}")
    flags, name, lead = m[1] or "", m[2].upper(), m[3]
    if name.isdigit():
        number = int(name)
        try:
            name = _signal.Signals(number).name.removeprefix("SIG")
        except ValueError:
            raise OptionError(f"--signal {text!r}: {number} is not a signal number") from None
    name = name.removeprefix("SIG")
    if name not in ("TERM", "INT"):
        raise OptionError(f"--signal {text!r}: node groups leave gracefully on TERM or INT, not {name}")
    if lead is not None and not 0 <= int(lead) <= 65535:
        raise OptionError(f"--signal {text!r}: the warning time is 0-65535 seconds")
    if limit is not None and lead is not None and int(lead) >= limit:
        raise OptionError(f"--signal {text!r}: the warning ({lead} s before the end) would come before the job "
                          f"starts (--time is {limit} s); give a longer --time or a shorter warning")
    return f"{flags + ':' if flags else ''}{name}{'@' + lead if lead is not None else ''}"


def check_word(option: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not _WORD.fullmatch(value):
        raise OptionError(f"{option} {value!r}: letters, digits and _ . , : + @ % = / - only (it goes into an "
                          f"#SBATCH line as it is)")
    return value


def check_sbatch_line(text: str) -> str:
    line = text.strip()
    if line.upper().startswith("#SBATCH"):
        line = line[len("#SBATCH"):].strip()
    if not line or "\n" in text or "\r" in text or not line.startswith("-"):
        raise OptionError(f"--sbatch-line {text!r}: one sbatch option, such as --constraint=cpu or "
                          f"'--mail-type=END' (the `#SBATCH ` is added)")
    return line


@dataclass
class SessionJob:
    """What a session's batch script is made of: the template's variables (see docs/slurm.md)."""

    topology: str  # absolute path, as the compute nodes read it
    topology_name: str
    host: str
    node: str
    nodes: int = 1
    ntasks_per_node: int = 2
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    sbatch_lines: tuple[str, ...] = ()
    mpi: str = "none"
    signal: str = DEFAULT_SIGNAL
    job_name: str = ""
    output_dir: str = "."
    registry: str | None = None
    log: str | None = None
    python: str = sys.executable

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    def variables(self) -> dict:
        v = dict(self.__dict__)
        v["ntasks"] = self.ntasks
        v["sbatch_lines"] = list(self.sbatch_lines)
        v["zpipe"] = f"{shlex.quote(self.python)} -m zpipe"
        # `--signal B:...` warns only the batch shell, which then passes it on to the tasks.
        flags, _, rest = self.signal.rpartition(":")
        v["signal_batch"] = "B" in flags
        v["signal_name"] = rest.split("@")[0]
        return v


class TemplateError(Exception):
    """A template that cannot be rendered: one line naming the template (and line) and what is wrong."""


def _template_line(exc: BaseException, filename: str) -> int | None:
    """The template line an error was raised at (jinja2 rewrites tracebacks to point into templates)."""
    line = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(job: SessionJob, template: str | os.PathLike | None = None, extra: dict | None = None) -> str:
    """The batch script for `job` from `template` (default: the shipped one). TemplateError in one line."""
    import jinja2

    path = Path(template) if template is not None else DEFAULT_TEMPLATE
    shown = str(template) if template is not None else f"the default template ({DEFAULT_TEMPLATE.name})"
    try:
        source = path.read_text()
    except OSError as exc:
        raise TemplateError(f"--template {template}: cannot read it: {exc.strerror or exc}") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["quote"] = lambda value: shlex.quote(str(value))
    filename = str(path.resolve())
    try:
        # Compiled under the file's own name, so that an error's traceback points into the template.
        code = env.compile(source, name=path.name, filename=filename)
        tmpl = jinja2.Template.from_code(env, code, env.make_globals(None))
        return tmpl.render(**job.variables(), **(extra or {}))
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, filename)
        where = f"{shown}:{line}" if line else shown
        m = re.match(r"'([^']*)' is undefined", str(exc))
        what = f"undefined variable {m[1]!r}" if m else f"undefined: {exc}"
        known = ", ".join(sorted(job.variables()))
        raise TemplateError(f"{where}: {what} (the variables are: {known})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{shown}:{exc.lineno}: template syntax error: {exc.message}") from None
    except jinja2.TemplateError as exc:
        line = _template_line(exc, filename)
        raise TemplateError(f"{shown}{':' + str(line) if line else ''}: {type(exc).__name__}: {exc}") from None


def positive(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise OptionError(f"{option} {text!r}: expected a whole number") from None
        if value < 1:
            raise OptionError(f"{option} {value}: must be at least 1")
        return value

    return parse


def job_from_args(args, topology) -> SessionJob:
    """Check the options against each other and against the topology; OptionError in one line."""
    from zpipe.hosts import AddressError, registry_from_topology

    nodes = positive("--nodes")(args.nodes)
    per_node = positive("--ntasks-per-node")(args.ntasks_per_node)
    limit = time_seconds(args.time) if args.time else None
    groups = [n for n, s in topology.nodes.items() if s.role == "nodegroup"]
    if args.node:
        if args.node not in topology.nodes:
            raise OptionError(f"--node {args.node!r} is not a node of the topology; its nodes: "
                              f"{', '.join(topology.nodes)}")
        if topology.nodes[args.node].role != "nodegroup":
            raise OptionError(f"--node {args.node!r} is a {topology.nodes[args.node].role}, not a nodegroup; "
                              f"a session runs node groups ({', '.join(groups) or 'the topology has none'})")
        node = args.node
    elif len(groups) == 1:
        node = groups[0]
    else:
        raise OptionError(f"the topology has {len(groups)} nodegroup nodes ({', '.join(groups) or 'none'}); "
                          f"a session runs one: name it with --node")
    spec = topology.nodes[node]
    host = args.host or spec.host
    if host not in topology.hosts:
        raise OptionError(f"--host {host!r} is not in the topology's hosts: {', '.join(topology.hosts)}")
    if spec.host != host:
        raise OptionError(f"--host {host!r}: node {node!r} is placed on host {spec.host!r}")
    ntasks = nodes * per_node
    if ntasks > spec.replicas:
        raise OptionError(f"{nodes} node{'s' * (nodes != 1)} x {per_node} node groups per node = {ntasks} tasks, "
                          f"but {node!r} has {spec.replicas} replica{'s' * (spec.replicas != 1)} (each task runs "
                          f"one, numbered by its rank): ask for at most {spec.replicas}, or raise `replicas`")
    if not args.registry and not topology.registry.address:
        try:
            registry_from_topology(topology)
        except AddressError as exc:
            raise OptionError(f"the job's node groups cannot find the registry: {exc}") from None
    if args.registry and not re.fullmatch(r"tcp://[^\s:]+:\d{1,5}", args.registry):
        raise OptionError(f"--registry {args.registry!r}: expected tcp://HOST:PORT")
    return SessionJob(
        topology=os.path.abspath(args.topology), topology_name=topology.name, host=host, node=node,
        nodes=nodes, ntasks_per_node=per_node, time=args.time.strip() if args.time else None,
        partition=check_word("--partition", args.partition), account=check_word("--account", args.account),
        sbatch_lines=tuple(check_sbatch_line(x) for x in args.sbatch_line), mpi=args.mpi,
        signal=check_signal(args.signal, limit), job_name=check_word("--job-name", args.job_name or
                                                                      f"zpipe-{topology.name}"),
        output_dir=os.path.abspath(args.output_dir), registry=args.registry,
        log=check_word("--log", args.log), python=sys.executable)


def run(args) -> int:
    from zpipe.topology.load import check_file

    topology, problems = check_file(args.topology)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"zpipe submit: {args.topology}: {len(problems)} problem{'s' * (len(problems) != 1)}; nothing submitted",
              file=sys.stderr)
        return 1
    try:
        job = job_from_args(args, topology)
        script = render(job, args.template)
    except (OptionError, TemplateError) as exc:
        print(f"zpipe submit: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    try:
        submitter = find_submitter(args.submitter)
        job_id = submitter.submit(script, workdir=os.getcwd())
    except SubmitError as exc:
        print(f"zpipe submit: {exc}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    print(f"zpipe submit: job {job_id}: {job.ntasks} node group{'s' * (job.ntasks != 1)} of {job.node} "
          f"(host {job.host}) join {topology.name}; see them with `zpipe sessions --registry ...`", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a session of node groups as a batch job (sbatch, or a submitter)")
    p.add_argument("topology")
    p.add_argument("-N", "--nodes", default="1", metavar="N", help="compute nodes (default 1)")
    p.add_argument("--ntasks-per-node", default="2", metavar="K",
                   help="node groups per compute node, one srun task each (default 2)")
    p.add_argument("-t", "--time", help="time limit, as sbatch takes it (30, 2:00:00, 1-12)")
    p.add_argument("-p", "--partition")
    p.add_argument("-A", "--account")
    p.add_argument("--sbatch-line", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH line, written --sbatch-line=--constraint=cpu (repeatable)")
    p.add_argument("--mpi", choices=MPI_TYPES, default="none",
                   help="srun --mpi: none (each task one replica, by rank) or pmi2 (the tasks are one MPI world "
                        "and gather with MPI)")
    p.add_argument("--host", help="the topology host the compute nodes play (default: the node group's)")
    p.add_argument("--node", help="the nodegroup node to run (default: the topology's only one)")
    p.add_argument("--signal", default=DEFAULT_SIGNAL,
                   help=f"sbatch --signal: the warning the job's tasks get before the time limit, to leave "
                        f"gracefully (default {DEFAULT_SIGNAL}: SIGTERM 60 s before)")
    p.add_argument("--job-name", help="default: zpipe-TOPOLOGY_NAME")
    p.add_argument("--output-dir", default=".", help="where the node groups write their files (on the compute nodes)")
    p.add_argument("--registry", help="the pipeline's registry, tcp://HOST:PORT (default: from the topology)")
    p.add_argument("--log", help="the job's output file (sbatch --output; default Slurm's slurm-%%j.out)")
    p.add_argument("--template", metavar="PATH", help="your own Jinja2 template (default: the shipped one)")
    p.add_argument("--submitter", default="sbatch",
                   help="how to submit: an entry point name of group zpipe.submitters (default sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.set_defaults(func=run)
