"""Load a topology file and check the whole graph before anything starts; report every problem at once."""

from __future__ import annotations

import os
from pydantic import BaseModel, ValidationError

from zpipe.topology.errors import Problem, TopologyError
from zpipe.topology.model import AnalysisSpec, AssembleSpec, HostSpec, NodeSpec, RegistrySpec, SocketSpec, Topology
from zpipe.topology.yamlpos import Parsed, Path, YAMLSyntaxError, parse


class Report:
    """Collects positioned problems for one file."""

    def __init__(self, file: str, parsed: Parsed | None = None):
        self.file, self.parsed, self.problems = file, parsed, []

    def add(self, path: Path, message: str, *, at_key: bool = False) -> None:
        pos = self.parsed.positions if self.parsed else None
        line, col = (pos.of_key(path) if at_key else pos.of(path)) if pos else (1, 1)
        dotted = ".".join(str(p) for p in path)
        self.problems.append(Problem(self.file, line, col, dotted, message))

    def pydantic(self, base: Path, err: ValidationError, model: type[BaseModel]) -> None:
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            path = (*base, *loc)
            if e["type"] == "extra_forbidden":
                allowed = _fields_at(model, loc[:-1])
                hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
                self.add(path, f"unknown key {loc[-1]!r}{hint}", at_key=True)
            elif e["type"] == "missing":
                self.add(path[:-1], f"missing required key {loc[-1]!r}", at_key=True)
            else:
                msg = e["msg"].removeprefix("Value error, ")
                self.add(path, msg)


def _fields_at(model: type[BaseModel], loc: Path) -> list[str]:
    """Field names of the sub-model reached by `loc` (skipping dict keys), for 'expected one of' hints."""
    nested = {
        (Topology, "nodes"): NodeSpec, (Topology, "hosts"): HostSpec,
        (Topology, "registry"): RegistrySpec, (NodeSpec, "sockets"): SocketSpec,
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


def check_file(path: str | os.PathLike) -> tuple[Topology | None, list[Problem]]:
    """Parse and validate; returns the topology (None if anything is wrong) and all problems."""
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        return None, [Problem(file, 1, 1, "", f"cannot read topology: {exc.strerror or exc}")]
    return check_text(text, file)


def check_text(text: str, file: str = "<topology>") -> tuple[Topology | None, list[Problem]]:
    try:
        parsed = parse(text)
    except YAMLSyntaxError as exc:
        return None, [Problem(file, exc.line, exc.column, "", exc.message)]
    report = Report(file, parsed)
    for path, here, first in parsed.duplicates:
        report.problems.append(Problem(file, *here, ".".join(map(str, path)),
                                       f"duplicate key {path[-1]!r} (first defined at line {first[0]})"))
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
        if not raw_nodes:
            report.add(("nodes",), "a topology needs at least one node")
        for name, raw in raw_nodes.items():
            try:
                nodes[name] = NodeSpec.model_validate(raw)
            except ValidationError as err:
                report.pydantic(("nodes", name), err, NodeSpec)
                salvaged = _salvage(raw, err)
                if salvaged is not None:
                    nodes[name] = salvaged
    from zpipe.topology.graph import check_graph  # imports the plugin catalog; keep parse-only paths light

    check_graph(report, top, nodes, set(raw_nodes) if isinstance(raw_nodes, dict) else set())
    if report.problems or top is None:
        return None, sorted(report.problems)
    return top.model_copy(update={"nodes": nodes}), []


def load_topology(path: str | os.PathLike) -> Topology:
    """The validated topology, or TopologyError listing every problem."""
    topo, problems = check_file(path)
    if problems:
        raise TopologyError(problems)
    assert topo is not None
    return topo
