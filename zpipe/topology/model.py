"""Typed model of a topology: nodes with a role, a plugin, placement and named sockets."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
Name = Annotated[str, Field(pattern=NAME)]

Pattern = Literal["push", "pull", "pub", "sub", "req", "rep", "dealer", "router", "pair"]

# Which pattern may talk to which: ZeroMQ's valid socket combinations.
PEERS: dict[str, set[str]] = {
    "push": {"pull"},
    "pull": {"push"},
    "pub": {"sub"},
    "sub": {"pub"},
    "req": {"rep", "router"},
    "rep": {"req", "dealer"},
    "dealer": {"router", "rep", "dealer"},
    "router": {"dealer", "req", "router"},
    "pair": {"pair"},
}
# Data flows from the first of these to the second; only such links can form forbidden cycles.
SENDERS = {"push", "pub"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SocketSpec(Strict):
    """One named socket of a node: its pattern, and whether it binds or connects to a peer."""

    pattern: Pattern
    connect: str | None = Field(None, description="`node.socket` this socket connects to; omit to bind")
    bind: bool | None = Field(None, description="defaults to true when `connect` is not given")
    port: int | None = Field(None, ge=1, le=65535, description="fixed port to bind; default: any free port")
    transport: Literal["tcp", "ipc"] = "tcp"
    # 100 messages of a 4D-Camera sector are 16 MB per peer; ZeroMQ's default of 1000 let an
    # aggregator with 12 peers hold 2 GB, and measured no faster.
    hwm: int = Field(100, ge=1, description="high-water mark, in messages per peer")

    @model_validator(mode="after")
    def _one_side(self) -> "SocketSpec":
        if self.connect is not None and self.bind:
            raise ValueError("a socket either binds or connects to a peer, not both")
        if self.connect is None and self.bind is False:
            raise ValueError("a socket that does not bind must name the peer it connects to (`connect: node.socket`)")
        if self.port is not None and self.connect is not None:
            raise ValueError("`port` is only for a socket that binds")
        return self

    @property
    def binds(self) -> bool:
        return self.connect is None


class AnalysisSpec(Strict):
    """One analysis a node group runs on every assembled item (several may share one stream)."""

    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)


class AssembleSpec(Strict):
    """How a node group puts items back together from parts (a frame from its sectors)."""

    key: str = Field(description="header field that identifies an item, e.g. frame_number")
    part: str = Field(description="header field numbering the part, 0..parts-1, e.g. module")
    parts: int = Field(ge=1, description="parts per item")
    shape: tuple[int, ...] = Field(description="shape of one part's payload, e.g. [144, 576]")
    dtype: str = Field("uint16", description="numpy dtype of the payload (little-endian)")


class NodeSpec(Strict):
    """A node of the graph: `replicas` processes of one role.

    `threads` is the process's parallel streams: sending threads for a producer or source;
    channels (a socket each, 1:1 with producer replicas) for an aggregator; receiving sockets
    (1:1 with the aggregator's channels) for a node group. The aggregator and the node group
    serve all their sockets from one thread, which costs less than threads taking turns at
    the GIL; `workers` are the node group's analysis threads.
    """

    role: str
    plugin: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    route: str | None = Field(None, description="header field whose value modulo the number of "
                              "downstream replicas picks the one a message goes to")
    assemble: AssembleSpec | None = None
    analyses: list[AnalysisSpec] = Field(default_factory=list)
    workers: int = Field(1, ge=1, le=256, description="node group: threads that run the analyses")
    batch: int = Field(16, ge=1, le=4096, description="node group: items per batch handed to analyses")
    scan_timeout: float = Field(10.0, gt=0, description="seconds of silence after which a scan is "
                                "finished with what arrived")
    fallback: str | None = Field(None, description="producer: directory for a scan's data when no "
                                 "node group is registered; default: no fallback, wait")
    fallback_wait: float = Field(5.0, ge=0, description="producer: seconds a scan waits for a node group "
                                 "to register before it goes to `fallback`")
    host: Name = "localhost"
    replicas: int = Field(1, ge=1, le=4096)
    threads: int = Field(1, ge=1, le=1024, description="parallel streams: sending threads, or channels / "
                                                             "receiving sockets (aggregator, node group)")
    sockets: dict[Name, SocketSpec] = Field(default_factory=dict)


class HostSpec(Strict):
    """A machine the graph runs on, and the address peers reach it at (never 0.0.0.0)."""

    address: str = "127.0.0.1"
    bind: str = Field("", description="interface to bind on; default: `address`")

    @model_validator(mode="after")
    def _reachable(self) -> "HostSpec":
        if self.address in ("0.0.0.0", "*", "::"):
            raise ValueError("`address` is what peers connect to and must be reachable; put 0.0.0.0 in `bind`")
        return self


class RegistrySpec(Strict):
    """The one bootstrap address; every other endpoint is found through the registry behind it."""

    host: Name | None = Field(None, description="the host that runs the registry server; default: the first host")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port (only for a single-host run)")
    address: str | None = Field(None, description="an external registry, e.g. tcp://10.0.0.5:5555; no server is started")


class StatusSpec(Strict):
    """How often nodes publish their status and counters; 0 turns it off."""

    interval: float = Field(0.5, ge=0, le=60)


class Topology(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    description: str = ""
    registry: RegistrySpec = RegistrySpec()
    status: StatusSpec = StatusSpec()
    hosts: dict[Name, HostSpec] = Field(default_factory=lambda: {"localhost": HostSpec()})
    nodes: dict[Name, NodeSpec]

    def hosts_used(self) -> list[str]:
        return sorted({n.host for n in self.nodes.values()})

    def registry_host(self) -> str:
        return self.registry.host or next(iter(self.hosts))
