"""Checks that need the whole graph: references, socket pairs, ports, cycles, roles and plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from zpipe import catalog
from zpipe.roles import ROLES
from zpipe.topology.model import PEERS, SENDERS, NodeSpec, Topology

if TYPE_CHECKING:
    from zpipe.topology.load import Report


def check_graph(report: "Report", top: Topology | None, nodes: dict[str, NodeSpec], names: set[str]) -> None:
    hosts = top.hosts if top else {}
    if top and top.registry.host and top.registry.host not in hosts:
        report.add(("registry", "host"), f"unknown host {top.registry.host!r}; hosts: {', '.join(hosts)}")
    for name, node in nodes.items():
        base = ("nodes", name)
        if top and node.host not in hosts:
            report.add((*base, "host"), f"unknown host {node.host!r}; hosts: {', '.join(hosts)}")
        _check_role_and_plugin(report, base, node)
        _check_links(report, base, node, nodes, names)
    _check_ports(report, top, nodes)
    _check_cycles(report, nodes)
    _check_thread_pairing(report, nodes)


def _check_role_and_plugin(report: "Report", base, node: NodeSpec) -> None:
    role = ROLES.get(node.role)
    if role is None:
        report.add((*base, "role"), f"unknown role {node.role!r}; roles: {', '.join(ROLES)}")
        return
    ins = [s for s in node.sockets.values() if s.pattern in role.inputs]
    outs = [s for s in node.sockets.values() if s.pattern in role.outputs]
    for sname, sock in node.sockets.items():
        if sock.pattern not in role.inputs | role.outputs:
            allowed = ", ".join(sorted(role.inputs | role.outputs))
            report.add((*base, "sockets", sname, "pattern"),
                       f"role {role.name!r} has no use for a {sock.pattern} socket (allowed: {allowed})")
    if len(ins) < role.min_inputs:
        report.add((*base, "sockets") if node.sockets else base,
                   f"role {role.name!r} needs an input socket ({' or '.join(sorted(role.inputs))})")
    if len(outs) < role.min_outputs:
        report.add((*base, "sockets") if node.sockets else base,
                   f"role {role.name!r} needs an output socket ({' or '.join(sorted(role.outputs))})")

    for fld in sorted(role.requires):
        if getattr(node, fld) is None:
            report.add(base, f"role {role.name!r} needs `{fld}`", at_key=True)
    for fld in ("route", "assemble", "fallback"):
        if getattr(node, fld) is not None and fld not in role.requires and not (
                fld in ("route", "fallback") and role.name == "producer"):
            report.add((*base, fld), f"role {role.name!r} has no use for `{fld}`")
    if role.analyses:
        if not node.analyses:
            report.add(base, f"role {role.name!r} needs at least one entry in `analyses`", at_key=True)
        for i, a in enumerate(node.analyses):
            _check_plugin(report, (*base, "analyses", i), a.plugin, a.params, "analysis", role.name)
    elif node.analyses:
        report.add((*base, "analyses"), f"role {role.name!r} runs no analyses")

    if role.plugin_kind is None:
        if node.plugin:
            report.add((*base, "plugin"), f"role {role.name!r} takes no plugin")
        return
    if not node.plugin:
        report.add(base, f"role {role.name!r} needs a `plugin` of kind {role.plugin_kind!r}", at_key=True)
        return
    _check_plugin(report, base, node.plugin, node.params, role.plugin_kind, role.name)


def _check_plugin(report: "Report", base, name: str, params: dict, kind: str, role: str) -> None:
    info = catalog.catalog().get(name)
    if info is None:
        installed = ", ".join(f"{n} ({i.kind})" for n, i in catalog.catalog().items() if i.ok)
        report.add((*base, "plugin"), f"unknown plugin {name!r}; installed: {installed or 'none'}")
        return
    if not info.ok:
        report.add((*base, "plugin"), f"plugin {name!r} from {info.distribution} cannot be used: {info.error}")
        return
    if info.kind != kind:
        report.add((*base, "plugin"), f"plugin {name!r} is a {info.kind}; role {role!r} runs a {kind}")
        return
    try:
        info.cls.Params.model_validate(params)
    except ValidationError as err:
        report.pydantic((*base, "params"), err, info.cls.Params)


def _check_links(report: "Report", base, node: NodeSpec, nodes: dict[str, NodeSpec], names: set[str]) -> None:
    for sname, sock in node.sockets.items():
        if sock.connect is None:
            continue
        where = (*base, "sockets", sname, "connect")
        peer_node, dot, peer_sock = sock.connect.partition(".")
        if not dot or not peer_node or not peer_sock:
            report.add(where, f"expected `node.socket`, got {sock.connect!r}")
            continue
        if peer_node not in names:
            report.add(where, f"unknown node {peer_node!r}; nodes: {', '.join(sorted(names))}")
            continue
        peer = nodes.get(peer_node)
        if peer is None:  # exists but is itself invalid: already reported there
            continue
        target = peer.sockets.get(peer_sock)
        if target is None:
            known = ", ".join(peer.sockets) or "none"
            report.add(where, f"node {peer_node!r} has no socket {peer_sock!r}; its sockets: {known}")
            continue
        if not target.binds:
            report.add(where, f"{sock.connect} connects too; one side of a link must bind")
        if target.pattern not in PEERS[sock.pattern]:
            report.add(where, f"incompatible sockets: {sock.pattern} cannot talk to {sock.connect} ({target.pattern}); "
                              f"{sock.pattern} pairs with {' or '.join(sorted(PEERS[sock.pattern]))}")
        if target.transport != sock.transport:
            report.add(where, f"transport {sock.transport} cannot reach {sock.connect} ({target.transport})")
        if sock.transport == "ipc" and peer.host != node.host:
            report.add(where, f"ipc only works on one host; {sock.connect} is on {peer.host!r}")


def _check_ports(report: "Report", top: Topology | None, nodes: dict[str, NodeSpec]) -> None:
    claimed: dict[tuple[str, int], tuple] = {}
    if top and top.registry.port and not top.registry.address:
        claimed[(top.registry_host(), top.registry.port)] = ("registry", "port")
    for name, node in nodes.items():
        for sname, sock in node.sockets.items():
            if sock.port is None:
                continue
            path = ("nodes", name, "sockets", sname, "port")
            if node.replicas > 1:
                report.add(path, f"{node.replicas} replicas on host {node.host!r} cannot all bind port {sock.port}")
            key = (node.host, sock.port)
            if key in claimed:
                first = claimed[key]
                line = report.parsed.positions.of(first)[0] if report.parsed else "?"
                report.add(path, f"port {sock.port} on host {node.host!r} is also claimed by "
                                 f"{'.'.join(map(str, first[:-1])) or 'registry'} (line {line})")
            else:
                claimed[key] = path


def _check_cycles(report: "Report", nodes: dict[str, NodeSpec]) -> None:
    """Data links (push->pull, pub->sub) must form a DAG, or a scan could never drain."""
    edges: dict[str, set[str]] = {n: set() for n in nodes}
    for name, node in nodes.items():
        for sock in node.sockets.values():
            peer_node, _, peer_sock = (sock.connect or "").partition(".")
            peer = nodes.get(peer_node)
            if peer is None or peer_sock not in peer.sockets:
                continue
            target = peer.sockets[peer_sock]
            if sock.pattern in SENDERS and target.pattern in PEERS[sock.pattern]:
                edges[name].add(peer_node)
            elif target.pattern in SENDERS and sock.pattern in PEERS[target.pattern]:
                edges[peer_node].add(name)
    state: dict[str, int] = {}
    reported: set[frozenset[str]] = set()

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    report.add(("nodes", m), "data cycle: " + " -> ".join([*cycle, m]), at_key=True)
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(nodes):
        if n not in state:
            visit(n, [])


def _check_thread_pairing(report: "Report", nodes: dict[str, NodeSpec]) -> None:
    """An aggregator has one thread per producer replica feeding it (the paper's 1:1 pairing)."""
    for name, node in nodes.items():
        if node.role != "aggregator":
            continue
        feeding = 0
        for other in nodes.values():
            for sock in other.sockets.values():
                peer, _, psock = (sock.connect or "").partition(".")
                if peer == name and psock in node.sockets and other.role == "producer":
                    feeding += other.replicas
        if feeding and node.threads != feeding:
            report.add(("nodes", name, "threads"),
                       f"an aggregator needs one thread per producer replica feeding it: {feeding}, not {node.threads}")
