"""The scan pipeline's wiring, computed once from the topology: who sends to whom, through which socket.

Every role and every check asks this one place which producer thread feeds which aggregator
channel, which node-group socket an upstream sender reaches, and which senders a receiver
may hear from; nothing after it parses a `node.socket` string again (as Vector compiles its
graph once). Sender ids are `node[replica]/thread` (a producer's sending thread, an
aggregator's channel); they travel in every message header and key every count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from zpipe.topology.model import Topology


class PlanError(ValueError):
    """The topology's links do not make a pipeline zpipe can run; says which node and why."""

    def __init__(self, node: str, message: str):
        super().__init__(f"{node}: {message}")
        self.node, self.message = node, message


def sender_id(node: str, replica: int, thread: int) -> str:
    return f"{node}[{replica}]/{thread}"


@dataclass(frozen=True)
class Link:
    """One end of a link: `node.socket`, and the peer end it is wired to."""

    node: str
    socket: str
    peer: str
    peer_socket: str


def links(topology: Topology) -> list[Link]:
    """Every declared connection, seen from the connecting side and from the bound side."""
    out = []
    for name, node in topology.nodes.items():
        for sname, sock in node.sockets.items():
            if sock.connect:
                peer, _, psock = sock.connect.partition(".")
                out.append(Link(name, sname, peer, psock))
                out.append(Link(peer, psock, name, sname))
    return out


def peers(topology: Topology, node: str, socket: str) -> list[tuple[str, str]]:
    """The `(node, socket)` ends linked to `node.socket`, whichever side declared the link."""
    return [(lk.peer, lk.peer_socket) for lk in links(topology) if lk.node == node and lk.socket == socket]


@dataclass(frozen=True)
class ScanPlan:
    """The producer -> [aggregator ->] node group pipeline of one topology.

    Producer replica r's threads all feed aggregator channel r (socket `in@r`), which feeds
    node-group socket `data@(r mod T)`; without an aggregator, producer replica r's threads
    feed `data@(r mod T)` directly. So each of a node group's receiving sockets carries whole
    sector streams, in frame order, which its flow control relies on.
    """

    producer: str
    producer_out: str
    producer_replicas: int
    producer_threads: int
    route: str  # the header field whose value picks the node group
    aggregator: str | None
    aggregator_in: str | None
    aggregator_out: str | None
    node_group: str
    node_group_in: str
    ng_threads: int  # the node group's receiving sockets
    ng_replicas: int
    key: str | None  # the header field that names an item (assemble.key)
    part: str | None = None  # the header field that numbers an item's part (assemble.part)
    service: bool = False  # the producers run as services: a sender that is gone may come back
    extra: dict = field(default_factory=dict, compare=False)

    # -- who sends what where ------------------------------------------------------------------
    def producer_sender(self, replica: int, thread: int) -> str:
        return sender_id(self.producer, replica, thread)

    def channel_sender(self, channel: int) -> str:
        return sender_id(self.aggregator, 0, channel)

    def channel_origins(self, channel: int) -> frozenset[str]:
        """The producer threads an aggregator channel may hear from."""
        return frozenset(self.producer_sender(channel, t) for t in range(self.producer_threads))

    def ng_socket_of_replica(self, producer_replica: int) -> int:
        return producer_replica % self.ng_threads

    @cached_property
    def via(self) -> dict[str, str]:
        """Origin (producer thread) -> the immediate sender a node group hears it through."""
        out = {}
        for r in range(self.producer_replicas):
            for t in range(self.producer_threads):
                out[self.producer_sender(r, t)] = self.channel_sender(r) if self.aggregator else self.producer_sender(r, t)
        return out

    @cached_property
    def ng_senders(self) -> dict[str, int]:
        """Immediate sender -> the node-group receiving socket it reaches."""
        out = {}
        for r in range(self.producer_replicas):
            socket = self.ng_socket_of_replica(r)
            if self.aggregator:
                out[self.channel_sender(r)] = socket
            else:
                for t in range(self.producer_threads):
                    out[self.producer_sender(r, t)] = socket
        return out

    @cached_property
    def sender_nodes(self) -> dict[str, tuple[str, int]]:
        """Immediate sender -> the (node, replica) whose liveness says whether it can still send."""
        if self.aggregator:
            return {self.channel_sender(r): (self.aggregator, 0) for r in range(self.producer_replicas)}
        return {self.producer_sender(r, t): (self.producer, r)
                for r in range(self.producer_replicas) for t in range(self.producer_threads)}

    def senders_into(self, socket: int) -> list[str]:
        return sorted(s for s, k in self.ng_senders.items() if k == socket)


def scan_plan(topology: Topology) -> ScanPlan | None:
    """The scan pipeline of a topology with producers and node groups; None for one without.

    Raises PlanError when producers and node groups are wired in a way no role can run.
    """
    producers = [n for n, s in topology.nodes.items() if s.role == "producer"]
    groups = [n for n, s in topology.nodes.items() if s.role == "nodegroup"]
    aggregators = [n for n, s in topology.nodes.items() if s.role == "aggregator"]
    if not producers and not groups and not aggregators:
        return None
    if len(producers) != 1:
        raise PlanError(producers[1] if producers else (groups or aggregators)[0],
                        f"a scan pipeline has exactly one producer node (its replicas are the receiving "
                        f"servers); found {len(producers)}: {', '.join(producers) or 'none'}")
    if len(groups) != 1:
        raise PlanError(groups[1] if groups else producers[0],
                        f"a scan pipeline has exactly one nodegroup node (its replicas are the node groups); "
                        f"found {len(groups)}: {', '.join(groups) or 'none'}")
    if len(aggregators) > 1:
        raise PlanError(aggregators[1], f"at most one aggregator node; found {', '.join(aggregators)}")
    pname, gname = producers[0], groups[0]
    prod, group = topology.nodes[pname], topology.nodes[gname]
    outs = [s for s, spec in prod.sockets.items() if spec.pattern == "push"]
    if len(outs) != 1:
        raise PlanError(pname, f"a producer has exactly one push socket; found {len(outs)}")
    ends = peers(topology, pname, outs[0])
    if len(ends) != 1:
        raise PlanError(pname, f"{pname}.{outs[0]} must be linked to exactly one socket; it is linked to {len(ends)}")
    peer, psock = ends[0]
    ng_in = [s for s, spec in group.sockets.items() if spec.pattern == "pull"]
    if len(ng_in) != 1:
        raise PlanError(gname, f"a nodegroup has exactly one pull socket; found {len(ng_in)}")
    agg = agg_in = agg_out = None
    if peer == gname:
        route = prod.route
        if route is None:
            raise PlanError(pname, "a producer that sends straight to node groups needs `route`")
    elif topology.nodes[peer].role == "aggregator":
        agg, agg_in = peer, psock
        spec = topology.nodes[agg]
        if spec.replicas != 1:
            raise PlanError(agg, f"an aggregator runs as one replica (producers connect to replica 0); "
                                 f"replicas: {spec.replicas}")
        if spec.threads != prod.replicas:
            raise PlanError(agg, f"an aggregator needs one channel (thread) per producer replica: "
                                 f"{prod.replicas}, not {spec.threads}")
        aouts = [s for s, sp in spec.sockets.items() if sp.pattern == "push"]
        if len(aouts) != 1:
            raise PlanError(agg, f"an aggregator has exactly one push socket; found {len(aouts)}")
        agg_out = aouts[0]
        down = peers(topology, agg, agg_out)
        if [n for n, _ in down] != [gname]:
            raise PlanError(agg, f"{agg}.{agg_out} must be linked to the nodegroup {gname!r} only")
        route = spec.route or prod.route
        if route is None:
            raise PlanError(agg, "an aggregator needs `route`")
        if [n for n, _ in peers(topology, agg, agg_in)] != [pname]:
            raise PlanError(agg, f"{agg}.{agg_in} must be fed by the producer {pname!r} only")
    else:
        raise PlanError(pname, f"a producer sends to an aggregator or a nodegroup, not to {peer!r} "
                               f"(role {topology.nodes[peer].role!r})")
    feeding = [n for n, _ in peers(topology, gname, ng_in[0])]
    if feeding != [agg or pname]:
        raise PlanError(gname, f"{gname}.{ng_in[0]} must be fed by {agg or pname!r} only; it is linked to "
                               f"{', '.join(feeding) or 'nothing'}")
    return ScanPlan(
        producer=pname, producer_out=outs[0], producer_replicas=prod.replicas, producer_threads=prod.threads,
        route=route, aggregator=agg, aggregator_in=agg_in, aggregator_out=agg_out,
        node_group=gname, node_group_in=ng_in[0], ng_threads=group.threads, ng_replicas=group.replicas,
        key=group.assemble.key if group.assemble else None, part=group.assemble.part if group.assemble else None,
        service=prod.service,
    )
