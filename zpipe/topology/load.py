"""Load a topology file and check the whole graph before anything starts; report every problem at once."""

from __future__ import annotations

import os
import re
from collections.abc import Collection

from pydantic import BaseModel, ValidationError

from zpipe.topology.errors import Problem, TopologyError
from zpipe.topology.model import (NAME, NAME_MAX, NAME_RULE, AnalysisSpec, AssembleSpec, HostSpec, NodeSpec,
                                  RegistrySpec, SecuritySpec, SocketSpec, Topology, machines_spanned, short)
from zpipe.topology.yamlpos import Parsed, Path, YAMLSyntaxError, line_col, parse

INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
MAX_BYTES = 1 << 20  # a topology is a few kB; anything near this is not one

_PLAIN = re.compile(r"[A-Za-z0-9_@-]+")


def _segment(part) -> str:
    """One part of a dotted path as printed: a plain name as is, anything else quoted."""
    text = str(part)
    return text if isinstance(part, int) or _PLAIN.fullmatch(text) else short(text, 40)


def printable(text: str) -> str:
    """`text` on one line, control characters and lone surrogates escaped (problems are printed)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


class Report:
    """Collects positioned problems for one file.

    `plugins_of`: the nodes whose plugins are checked (each imported to check it); None, every node's.
    """

    def __init__(self, file: str, parsed: Parsed | None = None, *, plugins_of: Collection[str] | None = None):
        self.file, self.parsed, self.problems = file, parsed, []
        self.plugins_of = None if plugins_of is None else frozenset(plugins_of)

    def checks_plugins_of(self, node: str) -> bool:
        return self.plugins_of is None or node in self.plugins_of

    def add(self, path: Path, message: str, *, at_key: bool = False) -> None:
        pos = self.parsed.positions if self.parsed else None
        line, col = (pos.of_key(path) if at_key else pos.of(path)) if pos else (1, 1)
        self.at(line, col, path, message)

    def at(self, line: int, col: int, path: Path, message: str) -> None:
        dotted = printable(".".join(_segment(p) for p in path))
        self.problems.append(Problem(self.file, line, col, dotted, printable(message)))

    def pydantic(self, base: Path, err: ValidationError, model: type[BaseModel]) -> None:
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            path = (*base, *loc)
            if loc and loc[-1] == "[key]":  # a dict key (a host or socket name) failed its pattern
                self.add(path[:-1], _bad_name(path[-2], e), at_key=True)
            elif e["type"] == "extra_forbidden":
                allowed = _fields_at(model, loc[:-1])
                hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
                self.add(path, f"unknown key {loc[-1]!r}{hint}", at_key=True)
            elif e["type"] == "missing":
                self.add(path[:-1], f"missing required key {loc[-1]!r}", at_key=True)
            else:
                msg = e["msg"].removeprefix("Value error, ")
                self.add(path, msg)


def _bad_name(name, e: dict) -> str:
    if e["type"] == "string_too_long":
        return f"name {short(name)} is longer than {NAME_MAX} characters"
    if e["type"] == "string_pattern_mismatch":
        return f"name {short(name)} is not a name: {NAME_RULE}"
    return f"name {short(name)}: {e['msg']}"


def _fields_at(model: type[BaseModel], loc: Path) -> list[str]:
    """Field names of the sub-model reached by `loc` (skipping dict keys), for 'expected one of' hints."""
    nested = {
        (Topology, "nodes"): NodeSpec, (Topology, "hosts"): HostSpec,
        (Topology, "registry"): RegistrySpec, (Topology, "security"): SecuritySpec, (NodeSpec, "sockets"): SocketSpec,
        (NodeSpec, "assemble"): AssembleSpec, (NodeSpec, "analyses"): AnalysisSpec,
    }
    current, skip = model, False
    for part in loc:
        if skip:
            skip = False
            continue
        nxt = nested.get((current, part))
        if nxt is None:
            return []
        skip = part in ("nodes", "hosts", "sockets", "analyses")  # the next part is a name or index
        current = nxt
    return list(current.model_fields)


def _salvage(raw, err: ValidationError) -> NodeSpec | None:
    """The node without its faulty keys (or sockets), so graph checks still see the rest of it."""
    if not isinstance(raw, dict):
        return None
    pruned = dict(raw)
    sockets = dict(raw.get("sockets") or {}) if isinstance(raw.get("sockets"), dict) else None
    for e in err.errors():
        loc = e["loc"]
        if len(loc) >= 2 and loc[0] == "sockets" and sockets is not None:
            sockets.pop(loc[1], None)
        elif loc:
            pruned.pop(loc[0], None)
    if sockets is not None and "sockets" in pruned:
        pruned["sockets"] = sockets
    try:
        return NodeSpec.model_validate(pruned)
    except ValidationError:
        return None


def _check_integers(report: Report, data) -> None:
    """Every integer must fit in 64 bits: values travel in msgpack (registry records, scan metadata).

    Said only where nothing else was (a `replicas` out of range has said so already)."""
    reported = {p.path for p in report.problems}
    todo = [((), data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            todo.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend(((*path, i), v) for i, v in enumerate(value))
        elif (isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX
              and printable(".".join(_segment(p) for p in path)) not in reported):
            digits = len(str(abs(value)))
            report.add(path, f"an integer of {digits} digits does not fit in 64 bits ({INT_MIN:,} to {INT_MAX:,}), "
                             f"which zpipe's messages carry")


TOO_BIG = f"the file is larger than {MAX_BYTES:,} bytes (1 MB), the most a topology may be"


def check_file(path: str | os.PathLike, *, output_dir: str | None = None, plugins_of: Collection[str] | None = None
               ) -> tuple[Topology | None, list[Problem]]:
    """Parse and validate; returns the topology (None if anything is wrong) and all problems.

    Never raises for what the file holds: every problem comes back positioned, FILE:LINE:COL.
    Plugins are imported to be checked, each named one alone; `plugins_of` limits that to the
    plugins of those nodes (a node process loads only its own).
    """
    file = os.fspath(path)
    shown = printable(file if isinstance(file, str) else os.fsdecode(file))
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        return None, [Problem(shown, 1, 1, "", printable(f"cannot read topology: {exc.strerror or exc}"))]
    if len(raw) > MAX_BYTES:
        return None, [Problem(shown, 1, 1, "", TOO_BIG)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = raw[:exc.start].decode("utf-8", "replace")
        line, col = line_col(prefix, len(prefix))
        return None, [Problem(shown, line, col, "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} ({exc.reason})")]
    return check_text(text, shown, output_dir=output_dir, plugins_of=plugins_of)


def check_text(text: str, file: str = "<topology>", *, output_dir: str | None = None,
               plugins_of: Collection[str] | None = None) -> tuple[Topology | None, list[Problem]]:
    """Validate a topology's text. `output_dir`, if known, makes the ipc path check exact;
    `plugins_of`, if given, checks (imports) only the plugins of those nodes."""
    if len(text) > MAX_BYTES:
        return None, [Problem(file, 1, 1, "", TOO_BIG)]
    try:
        parsed = parse(text)
    except YAMLSyntaxError as exc:
        return None, [Problem(file, exc.line, exc.column, "", printable(exc.message))]
    report = Report(file, parsed, plugins_of=plugins_of)
    for path, here, first in parsed.duplicates:
        report.at(*here, path, f"duplicate key {short(path[-1])} (first defined at line {first[0]})")
    for path, here, message in parsed.problems:
        report.at(*here, path, message)
    data = parsed.data
    if not isinstance(data, dict):
        report.add((), "a topology is a mapping with at least `name` and `nodes`")
        return None, report.problems

    # Validate the frame without the nodes, then each node on its own, so one bad node
    # does not hide problems in the others or in the graph between them.
    raw_nodes = data.get("nodes")
    frame = {**data, "nodes": {}} if isinstance(raw_nodes, dict) else data
    top: Topology | None = None
    try:
        top = Topology.model_validate(frame)
    except ValidationError as err:
        report.pydantic((), err, Topology)
    nodes: dict[str, NodeSpec] = {}
    if isinstance(raw_nodes, dict):
        if not raw_nodes and not any(path == ("nodes",) for path, _, _ in parsed.problems):
            report.add(("nodes",), "a topology needs at least one node")
        for name, raw in raw_nodes.items():
            if len(name) > NAME_MAX:
                report.add(("nodes", name), f"node name {short(name)} is longer than {NAME_MAX} characters", at_key=True)
            elif not re.fullmatch(NAME.strip("^$"), name):
                report.add(("nodes", name), f"node name {short(name)} is not a name: {NAME_RULE}", at_key=True)
            try:
                nodes[name] = NodeSpec.model_validate(raw)
            except ValidationError as err:
                report.pydantic(("nodes", name), err, NodeSpec)
                salvaged = _salvage(raw, err)
                if salvaged is not None:
                    nodes[name] = salvaged
    from zpipe.topology.graph import check_graph  # plugins are imported there, and only those it checks

    check_graph(report, top, nodes, set(raw_nodes) if isinstance(raw_nodes, dict) else set(), output_dir=output_dir)
    base_dir = os.path.dirname(os.path.abspath(file)) if file != "<topology>" else os.getcwd()
    if top is not None and top.security is not None:
        from zpipe import security

        security.check(report, top, nodes, base_dir)
    elif top is not None and data.get("security") != "none" and machines_spanned(top.hosts, nodes):
        # Secure by default across machines: open only when the topology says so (docs/security.md).
        report.add(("hosts",), f"the nodes run on several machines ({', '.join(machines_spanned(top.hosts, nodes))}) and the "
                   f"topology says nothing of `security:`: anyone who reaches them could read its registry, write "
                   f"its keys and inject data. Make keys (`zpipe keys DIR --topology FILE`) and add "
                   f"`security: {{keys: DIR}}`, or write `security: none` to run it open", at_key=True)
    _check_integers(report, data)
    if report.problems or top is None:
        return None, sorted(report.problems)
    update = {"nodes": nodes}
    if top.security is not None and not os.path.isabs(top.security.keys):  # found from anywhere a node runs
        update["security"] = top.security.model_copy(update={"keys": os.path.join(base_dir, top.security.keys)})
    return top.model_copy(update=update), []


def load_topology(path: str | os.PathLike, *, plugins_of: Collection[str] | None = None) -> Topology:
    """The validated topology, or TopologyError listing every problem.

    A node process passes `plugins_of=[its node]`: the runner has checked the whole topology
    already, and the process must not import the plugins of other nodes (numba, h5py, ...)."""
    topo, problems = check_file(path, plugins_of=plugins_of)
    if problems:
        raise TopologyError(problems)
    assert topo is not None
    return topo
