"""Checks that need the whole graph: references, socket pairs, ports, cycles, roles and plugins.

Beyond the shape of the graph, these check what the runtime needs to start (zpipe/runtime.py,
zpipe/roles/*.py): the producer -> [aggregator ->] nodegroup chain the scan protocol runs on,
the threads each side pairs with, the item a node group assembles, ports and ipc paths.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING

from pydantic import ValidationError

from zpipe import catalog
from zpipe.roles import ROLES
from zpipe.topology.model import IPC_PATH_MAX, PEERS, SENDERS, NodeSpec, Topology, item_dtype, short

if TYPE_CHECKING:
    from zpipe.topology.load import Report

MAX_ITEM_BYTES = 256 << 20  # one assembled item (all its parts)
MAX_BATCH_BYTES = 4 << 30  # a batch of items, stacked for the analyses in one array
IPC_DIR_ALLOWANCE = 48  # bytes of the ipc path left for --output-dir when validation does not know it
LISTED = 12  # names listed in a message, at most


def _names(names) -> str:
    names = sorted(map(str, names))
    more = f", ... ({len(names)} in all)" if len(names) > LISTED else ""
    return ", ".join(names[:LISTED]) + more


def check_graph(report: "Report", top: Topology | None, nodes: dict[str, NodeSpec], names: set[str],
                *, output_dir: str | None = None) -> None:
    hosts = top.hosts if top else {}
    if top and top.registry.host and top.registry.host not in hosts:
        report.add(("registry", "host"), f"unknown host {top.registry.host!r}; hosts: {_names(hosts)}")
    for name, node in nodes.items():
        base = ("nodes", name)
        if top and node.host not in hosts:
            report.add((*base, "host"), f"unknown host {node.host!r}; hosts: {_names(hosts)}")
        _check_role_and_plugin(report, base, node)
        _check_links(report, base, node, nodes, names)
        _check_assemble(report, base, node)
    links, broken = _link_index(nodes)
    _check_chain(report, nodes, links, broken)
    _check_ports(report, top, nodes)
    _check_ipc(report, nodes, output_dir)
    _check_cycles(report, nodes, links)
    if not report.problems and top is not None:
        _check_plan(report, top, nodes)


def _check_plan(report: "Report", top: Topology, nodes: dict[str, NodeSpec]) -> None:
    """The runtime's own reading of the scan pipeline (zpipe.topology.plan, where present) must agree."""
    try:
        from zpipe.topology.plan import PlanError, scan_plan
    except ImportError:
        return
    try:
        scan_plan(top.model_copy(update={"nodes": nodes}))
    except PlanError as exc:
        node = exc.node if exc.node in nodes else None
        report.add(("nodes", node) if node else ("nodes",), exc.message, at_key=node is not None)


def _check_role_and_plugin(report: "Report", base, node: NodeSpec) -> None:
    role = ROLES.get(node.role)
    if role is None:
        report.add((*base, "role"), f"unknown role {short(node.role)}; roles: {', '.join(ROLES)}")
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
    # The protocol roles use exactly one input and one output socket (runtime: inputs()[0], outputs()[0]).
    single = {"producer": ("output", outs), "aggregator": ("input", ins), "nodegroup": ("input", ins)}
    checks = [single[role.name]] if role.name in single else []
    if role.name == "aggregator":
        checks.append(("output", outs))
    for kind, socks in checks:
        if len(socks) > 1:
            extra = [n for n, s in node.sockets.items() if s in socks][1:]
            for sname in extra:
                report.add((*base, "sockets", sname),
                           f"role {role.name!r} uses one {kind} socket only; this one would never be used")

    for fld in sorted(role.requires):
        if getattr(node, fld) is None:
            report.add(base, f"role {role.name!r} needs `{fld}`", at_key=True)
    for fld in ("route", "assemble", "fallback"):
        if getattr(node, fld) is not None and fld not in role.requires and not (
                fld in ("route", "fallback") and role.name == "producer"):
            report.add((*base, fld), f"role {role.name!r} has no use for `{fld}`")
    if node.service and role.name != "producer":
        report.add((*base, "service"), f"role {role.name!r} cannot be a service; only a producer takes acquisitions "
                   f"(the others serve as long as their senders do)")
    if role.analyses:
        if not node.analyses:
            report.add(base, f"role {role.name!r} needs at least one entry in `analyses`", at_key=True)
        first: dict[str, int] = {}
        for i, a in enumerate(node.analyses):
            _check_plugin(report, (*base, "analyses", i), a.plugin, a.params, "analysis", role.name)
            if a.label in first:
                line = report.parsed.positions.of((*base, "analyses", first[a.label]))[0] if report.parsed else "?"
                report.add((*base, "analyses", i, "name") if a.name else (*base, "analyses", i, "plugin"),
                           f"a second analysis named {a.label!r} (the first is at line {line}); give each a "
                           f"distinct `name`: outputs and reports are keyed by it")
            else:
                first[a.label] = i
    elif node.analyses:
        report.add((*base, "analyses"), f"role {role.name!r} runs no analyses")

    if role.plugin_kind is None:
        if node.plugin:
            report.add((*base, "plugin"), f"role {role.name!r} takes no plugin")
        if node.params:
            report.add((*base, "params"), f"role {role.name!r} takes no plugin, so no `params`")
        return
    if not node.plugin:
        report.add(base, f"role {role.name!r} needs a `plugin` of kind {role.plugin_kind!r}", at_key=True)
        return
    _check_plugin(report, base, node.plugin, node.params, role.plugin_kind, role.name)
    if node.service and node.plugin and report.checks_plugins_of(base[1]):
        info = catalog.info(node.plugin)
        if info is not None and info.ok and info.kind == "source" and not info.cls.takes_requests():
            report.add((*base, "service"), f"plugin {node.plugin!r} takes no acquisition requests (it has no "
                       f"`acquire`), so it cannot run as a service; run it in batch (service: false)")


def _check_plugin(report: "Report", base, name: str, params: dict, kind: str, role: str) -> None:
    if not report.checks_plugins_of(base[1]):  # another node's plugin, in a node process: not ours to import
        return
    info = catalog.info(name)  # imports this plugin only
    if info is None:  # a mistake to correct: worth importing every plugin to list what would do
        installed = ", ".join(f"{n} ({i.kind})" for n, i in catalog.catalog().items() if i.ok)
        report.add((*base, "plugin"), f"unknown plugin {short(name)}; installed: {installed or 'none'}")
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
    except Exception as exc:  # a plugin's own validator that raises something else: still its params' fault
        report.add((*base, "params"), f"plugin {name!r} rejects its params: {type(exc).__name__}: {exc}")


def _check_links(report: "Report", base, node: NodeSpec, nodes: dict[str, NodeSpec], names: set[str]) -> None:
    for sname, sock in node.sockets.items():
        if sock.connect is None:
            continue
        where = (*base, "sockets", sname, "connect")
        peer_node, dot, peer_sock = sock.connect.partition(".")
        if not dot or not peer_node or not peer_sock:
            report.add(where, f"expected `node.socket`, got {short(sock.connect)}")
            continue
        if peer_node not in names:
            report.add(where, f"unknown node {short(peer_node)}; nodes: {_names(names)}")
            continue
        peer = nodes.get(peer_node)
        if peer is None:  # exists but is itself invalid: already reported there
            continue
        target = peer.sockets.get(peer_sock)
        if target is None:
            known = ", ".join(peer.sockets) or "none"
            report.add(where, f"node {peer_node!r} has no socket {short(peer_sock)}; its sockets: {known}")
            continue
        if peer_node == base[1] and peer_sock == sname:
            report.add(where, "a socket cannot connect to itself")
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


def _check_assemble(report: "Report", base, node: NodeSpec) -> None:
    """The item a node group assembles: its size must fit in memory, batch by batch."""
    a = node.assemble
    if a is None:
        return
    where = (*base, "assemble")
    if a.key == a.part:
        report.add((*where, "part"), f"`key` and `part` are both {a.key!r}; an item's key and its part "
                                     f"number are different header fields")
    try:
        itemsize = item_dtype(a.dtype).itemsize
    except ValueError:
        return  # reported by the model
    item = a.parts * math.prod(a.shape) * itemsize
    if item > MAX_ITEM_BYTES:
        report.add((*where, "shape"), f"an item ({a.parts} parts of {'x'.join(map(str, a.shape))} {a.dtype}) "
                                      f"is {_size(item)}; at most {_size(MAX_ITEM_BYTES)}")
    elif item * node.batch > MAX_BATCH_BYTES:
        report.add((*base, "batch"), f"a batch of {node.batch} items of {_size(item)} is {_size(item * node.batch)}, "
                                     f"stacked in one array; at most {_size(MAX_BATCH_BYTES)}: lower `batch`")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}" if n < scale * 1e6 else f"{n:.3g} bytes"
    return f"{n} bytes"


def _link_index(nodes: dict[str, NodeSpec]):
    """Every valid link, from both ends: (node, socket) -> [(peer node, peer socket)].

    Also the (node) names that some `connect` points at without reaching a socket, so that a
    node whose link is broken is not also told that it is linked to nothing.
    """
    links: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    broken: set[str] = set()
    for name, node in nodes.items():
        for sname, sock in node.sockets.items():
            if sock.connect is None:
                continue
            peer_node, _, peer_sock = sock.connect.partition(".")
            peer = nodes.get(peer_node)
            target = peer.sockets.get(peer_sock) if peer else None
            if target is None or (peer_node, peer_sock) == (name, sname) or target.pattern not in PEERS[sock.pattern]:
                broken.add(peer_node)
                broken.add(name)
                continue
            links[(name, sname)].append((peer_node, peer_sock))
            links[(peer_node, peer_sock)].append((name, sname))
    return links, broken


def _role(nodes: dict[str, NodeSpec], name: str) -> str:
    return nodes[name].role


def _check_chain(report: "Report", nodes: dict[str, NodeSpec], links, broken: set[str]) -> None:
    """The scan protocol's chain, producer -> [aggregator ->] nodegroup, as the roles' code walks it."""
    # One scan pipeline per topology: scan records are keyed by scan number alone.
    for role, what in (("producer", "its replicas are the receiving servers"),
                       ("aggregator", "its threads are the channels"),
                       ("nodegroup", "its replicas are the node groups")):
        of_role = [n for n, spec in nodes.items() if spec.role == role]
        for extra in of_role[1:]:
            report.add(("nodes", extra), f"a topology runs one scan pipeline, with one {role} node ({what}); "
                                         f"{of_role[0]!r} is one already", at_key=True)
    for name, node in nodes.items():
        role = ROLES.get(node.role)
        if role is None:
            continue
        base = ("nodes", name)
        ins = [s for s, spec in node.sockets.items() if spec.pattern in role.inputs]
        outs = [s for s, spec in node.sockets.items() if spec.pattern in role.outputs]
        if role.name == "producer" and outs:
            _producer(report, nodes, links, broken, name, node, outs[0])
        elif role.name == "aggregator":
            if node.replicas > 1:
                report.add((*base, "replicas"), f"an aggregator runs as one replica: producers send to replica 0 "
                                                f"only, so {node.replicas - 1} would wait forever")
            if ins:
                _fed(report, nodes, links, broken, name, node, ins[0], ("producer",))
            if outs:
                _aggregator_out(report, nodes, links, broken, name, outs[0])
        elif role.name == "nodegroup" and ins:
            _fed(report, nodes, links, broken, name, node, ins[0], ("producer", "aggregator"))
        elif role.name in ("source", "stage"):
            for sname in outs:
                if node.sockets[sname].pattern == "push" and not links.get((name, sname)) and name not in broken:
                    report.add((*base, "sockets", sname), "nothing receives from this push socket: a sender "
                                                          "would wait forever; link it (`connect`) or remove it")


def _producer(report, nodes, links, broken, name: str, node: NodeSpec, out: str) -> None:
    where = ("nodes", name, "sockets", out)
    peers = links.get((name, out), [])
    if not peers:
        if name not in broken:
            report.add(where, "a producer's output must reach an aggregator or a nodegroup "
                              "(`connect: aggregator.in` or `connect: nodegroup.data`); it is linked to nothing")
        return
    if len(peers) > 1:
        report.add(where, f"linked to {len(peers)} sockets ({_names(f'{n}.{s}' for n, s in peers)}); "
                          f"a producer feeds one aggregator or one nodegroup")
        return
    peer, _ = peers[0]
    role = _role(nodes, peer)
    if role not in ("aggregator", "nodegroup"):
        report.add(where, f"a producer sends to an aggregator or a nodegroup, not to {peer!r} (role {role!r}): "
                          f"the scan's counts and routing need them")
        return
    if role == "nodegroup" and node.route is None:
        report.add(("nodes", name), "a producer that sends straight to a nodegroup needs `route` (the header "
                                    "field whose value picks the node group)", at_key=True)
    agg_route = nodes[peer].route
    if role == "aggregator" and node.route is not None and agg_route is not None and node.route != agg_route:
        report.add(("nodes", name, "route"), f"route {node.route!r} differs from the route of its aggregator "
                                             f"{peer!r} ({agg_route!r}): the counts it announces would not match "
                                             f"where the aggregator sends")
        return
    # All parts of an item must meet on one node group, and the node group counts on keys
    # arriving 1 in N (its workers' lanes, its flow-control window): route by the item's key.
    if role == "nodegroup":
        group, route_at = peer, ("nodes", name, "route")
    else:
        down = links.get((peer, next((s for s, sp in nodes[peer].sockets.items() if sp.pattern == "push"), "")), [])
        group = down[0][0] if len(down) == 1 and _role(nodes, down[0][0]) == "nodegroup" else None
        route_at = ("nodes", peer, "route") if agg_route is not None else ("nodes", name, "route")
    route = node.route if role == "nodegroup" else (agg_route or node.route)
    asm = nodes[group].assemble if group else None
    if asm is not None and route is not None and route != asm.key:
        report.add(route_at, f"route {route!r} is not the item key of nodegroup {group!r} "
                             f"(assemble.key {asm.key!r}): the parts of one item would be sent to different "
                             f"node groups")


def _aggregator_out(report, nodes, links, broken, name: str, out: str) -> None:
    where = ("nodes", name, "sockets", out)
    peers = links.get((name, out), [])
    if not peers:
        if name not in broken:
            report.add(where, "an aggregator's output must reach a nodegroup (`connect: nodegroup.data`); "
                              "it is linked to nothing")
        return
    if len(peers) > 1:
        report.add(where, f"linked to {len(peers)} sockets ({_names(f'{n}.{s}' for n, s in peers)}); "
                          f"an aggregator feeds one nodegroup")
        return
    peer, _ = peers[0]
    if _role(nodes, peer) != "nodegroup":
        report.add(where, f"an aggregator sends to a nodegroup, not to {peer!r} (role {_role(nodes, peer)!r})")


def _fed(report, nodes, links, broken, name: str, node: NodeSpec, sock: str, feeders: tuple[str, ...]) -> None:
    """An aggregator's or node group's input: fed by exactly one node of the right role, threads paired."""
    where = ("nodes", name, "sockets", sock)
    peers = links.get((name, sock), [])
    kinds = " or ".join(f"a {f}" for f in feeders)
    if not peers:
        if name not in broken:
            report.add(where, f"nothing feeds this input; {kinds} must connect to it (`connect: {name}.{sock}`)")
        return
    wrong = sorted({p for p, _ in peers if _role(nodes, p) not in feeders})
    for p in wrong:
        report.add(where, f"fed by {p!r} (role {_role(nodes, p)!r}); only {kinds} can feed a {node.role}: "
                          f"it binds this input once per thread, under names only they know")
    if wrong:
        return
    senders = sorted({p for p, _ in peers})
    if len(senders) > 1:
        report.add(where, f"fed by {len(senders)} nodes ({_names(senders)}); a {node.role} is fed by one")
        return
    up = nodes[senders[0]]
    if node.role == "aggregator":
        if node.threads != up.replicas:
            report.add(("nodes", name, "threads"), f"an aggregator needs one thread per producer replica feeding it: "
                                                   f"{up.replicas}, not {node.threads}")
    elif up.role == "aggregator":
        if node.threads != up.threads:
            report.add(("nodes", name, "threads"), f"a nodegroup needs one receiving thread per thread of the "
                                                   f"aggregator feeding it: {up.threads}, not {node.threads}")
    elif node.threads != up.replicas:
        report.add(("nodes", name, "threads"), f"a nodegroup fed straight by a producer needs one receiving thread "
                                               f"per producer replica: {up.replicas}, not {node.threads}")


def _host_address(top: Topology | None, host: str) -> str:
    spec = top.hosts.get(host) if top else None
    if spec is not None and spec.dynamic:
        return f"host {host}"  # known only when it starts: a machine of its own, as far as we can tell
    return spec.address if spec else host


def _check_ports(report: "Report", top: Topology | None, nodes: dict[str, NodeSpec]) -> None:
    # Hosts that share an address are one machine: their fixed ports collide too.
    claimed: dict[tuple[str, int], tuple] = {}
    if top and top.registry.port and not top.registry.address and top.hosts:
        claimed[(_host_address(top, top.registry_host()), top.registry.port)] = ("registry", "port")
    for name, node in nodes.items():
        role = ROLES.get(node.role)
        for sname, sock in node.sockets.items():
            if sock.port is None:
                continue
            path = ("nodes", name, "sockets", sname, "port")
            if role is not None and role.per_thread_inputs and sock.pattern in role.inputs:
                report.add(path, f"a {role.name} binds its input once per thread, each on a free port: "
                                 f"a fixed `port` cannot be used here")
                continue
            if node.replicas > 1:
                report.add(path, f"{node.replicas} replicas on host {node.host!r} cannot all bind port {sock.port}")
            key = (_host_address(top, node.host), sock.port)
            if key in claimed:
                first = claimed[key]
                line = report.parsed.positions.of(first)[0] if report.parsed else "?"
                report.add(path, f"port {sock.port} on host {node.host!r} is also claimed by "
                                 f"{'.'.join(map(str, first[:-1])) or 'registry'} (line {line})")
            else:
                claimed[key] = path


def _check_ipc(report: "Report", nodes: dict[str, NodeSpec], output_dir: str | None) -> None:
    """ipc sockets are files `{output-dir}/{node}-{replica}-{socket}.sock`; a unix socket path has 107 bytes."""
    room = IPC_PATH_MAX - (len(os.path.abspath(output_dir).encode()) if output_dir is not None else IPC_DIR_ALLOWANCE)
    for name, node in nodes.items():
        role = ROLES.get(node.role)
        for sname, sock in node.sockets.items():
            if sock.transport != "ipc":
                continue
            per_thread = role is not None and role.per_thread_inputs and sock.pattern in role.inputs
            if not sock.binds and not per_thread:
                continue
            suffix = f"@{node.threads - 1}" if per_thread else ""
            file = f"/{name}-{node.replicas - 1}-{sname}{suffix}.sock"
            if len(file.encode()) > room:
                where = (f"--output-dir {output_dir!r}" if output_dir is not None
                         else f"an --output-dir of up to {IPC_DIR_ALLOWANCE} bytes")
                report.add(("nodes", name, "sockets", sname, "transport"),
                           f"the ipc socket file {file[1:]!r} is too long for a unix socket path "
                           f"({IPC_PATH_MAX} bytes) with {where} in front; shorten the node or socket name, "
                           f"or use tcp")


def _check_cycles(report: "Report", nodes: dict[str, NodeSpec], links) -> None:
    """Data links (push->pull, pub->sub) must form a DAG, or a scan could never drain."""
    edges: dict[str, set[str]] = {n: set() for n in nodes}
    for (name, sname), peers in links.items():
        sock = nodes[name].sockets[sname]
        if sock.pattern not in SENDERS:
            continue
        for peer_node, _ in peers:
            edges[name].add(peer_node)
    state: dict[str, int] = {}
    reported: set[frozenset[str]] = set()
    for start in sorted(nodes):  # iterative depth-first search: a long chain must not exhaust the stack
        if start in state:
            continue
        state[start] = 1
        stack = [start]
        todo = [iter(sorted(edges[start]))]
        while todo:
            m = next(todo[-1], None)
            if m is None:
                state[stack.pop()] = 2
                todo.pop()
                continue
            if state.get(m) == 1:
                cycle = stack[stack.index(m):]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    report.add(("nodes", m), "data cycle: " + " -> ".join([*cycle, m]), at_key=True)
            elif m not in state:
                state[m] = 1
                stack.append(m)
                todo.append(iter(sorted(edges[m])))
