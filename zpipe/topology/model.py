"""Typed model of a topology: nodes with a role, a plugin, placement and named sockets."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
NAME_MAX = 64  # names are parts of registry keys (at most 1024 bytes) and of ipc socket paths
Name = Annotated[str, Field(pattern=NAME, max_length=NAME_MAX)]
NAME_RULE = "letters, digits, _ and -, starting with a letter or _"

MAX_PARTS = 64  # parts per item: an item's arrived parts are a bit mask
MAX_NDIM = 32  # numpy's limit is 64; a part of a detector frame has 2
FIXED_PORT_MIN = 1024  # below it, binding needs root
HOUR = 3600.0
# Hosts: ZeroMQ resolves a host name or an interface name when it binds; IPv6 would need
# ZMQ_IPV6, which zpipe does not set, so only IPv4 literals work.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def check_host(value: str, what: str, *, wildcard: bool = False) -> str:
    """`value` as a host ZeroMQ can bind or connect to (IPv4 literal, host or interface name); else ValueError."""
    if wildcard and value in ("0.0.0.0", "*"):
        return value
    if not value:
        raise ValueError(f"{what} is empty; give a host name or an IPv4 address")
    if ":" in value or "/" in value:
        try:
            ipaddress.IPv6Address(value.strip("[]"))
        except ValueError:
            raise ValueError(f"{what} {short(value)} is not a host name or an IPv4 address "
                             f"(no scheme, no port: those come from the registry)") from None
        raise ValueError(f"{what} {short(value)} is IPv6, which zpipe's sockets do not use; give an IPv4 address "
                         f"or a host name")
    if re.fullmatch(r"[0-9.]+", value):
        try:
            ip = ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{what} {short(value)} is not a valid IPv4 address") from None
        if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255") or (ip.is_unspecified and not wildcard):
            raise ValueError(f"{what} {short(value)} is not an address a socket can bind or connect to")
        return value
    if len(value) > 253 or not _HOSTNAME.fullmatch(value):
        raise ValueError(f"{what} {short(value)} is not a host name, an interface name or an IPv4 address")
    return value


AUTO = "auto"  # a host's `address` found when it starts: the one that routes toward the registry
IFNAMSIZ = 16  # Linux: an interface name has at most 15 bytes


def check_interface(value: str) -> str:
    """`value` as a network interface name Linux accepts (dev_valid_name); else ValueError."""
    if len(value.encode("utf-8", "surrogatepass")) >= IFNAMSIZ:
        raise ValueError(f"interface {short(value)} is longer than {IFNAMSIZ - 1} bytes, the most an interface "
                         f"name has")
    if value in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.@-]+", value):
        raise ValueError(f"interface {short(value)} is not an interface name (e.g. eth0, ib0, enp1s0)")
    return value


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
IPC_PATH_MAX = 107  # bytes of a unix socket's path (sockaddr_un.sun_path, less its NUL)

# Data flows from the first of these to the second; only such links can form forbidden cycles.
SENDERS = {"push", "pub"}


class Strict(BaseModel):
    # inf and nan are never meant: a timeout of .inf overflows the waits it becomes
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SocketSpec(Strict):
    """One named socket of a node: its pattern, and whether it binds or connects to a peer."""

    pattern: Pattern
    connect: str | None = Field(None, description="`node.socket` this socket connects to; omit to bind")
    bind: bool | None = Field(None, description="defaults to true when `connect` is not given")
    port: int | None = Field(None, ge=1, le=65535, description="fixed port to bind; default: any free port")
    transport: Literal["tcp", "ipc"] = "tcp"
    # 100 messages of a 4D-Camera sector are 16 MB per peer; ZeroMQ's default of 1000 let an
    # aggregator with 12 peers hold 2 GB, and measured no faster.
    hwm: int = Field(100, ge=1, le=2**31 - 1, description="high-water mark, in messages per peer")

    @field_validator("port")
    @classmethod
    def _unprivileged(cls, port: int | None) -> int | None:
        if port is not None and port < FIXED_PORT_MIN:
            raise ValueError(f"port {port} is privileged (below {FIXED_PORT_MIN}): binding it needs root; "
                             f"pick one in {FIXED_PORT_MIN}-65535, or none for any free port")
        return port

    @model_validator(mode="after")
    def _one_side(self) -> "SocketSpec":
        if self.connect is not None and self.bind:
            raise ValueError("a socket either binds or connects to a peer, not both")
        if self.connect is None and self.bind is False:
            raise ValueError("a socket that does not bind must name the peer it connects to (`connect: node.socket`)")
        if self.port is not None and self.connect is not None:
            raise ValueError("`port` is only for a socket that binds")
        if self.port is not None and self.transport == "ipc":
            raise ValueError("`port` is only for tcp: an ipc socket is a file")
        return self

    @property
    def binds(self) -> bool:
        return self.connect is None


class AnalysisSpec(Strict):
    """One analysis a node group runs on every assembled item (several may share one stream).

    `name` keys its figures, outputs and report entry; it defaults to the plugin's name, so one
    plugin listed twice (two virtual detectors, say) needs a name for at least one of them."""

    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    name: Name | None = Field(None, description="the analysis's name in the node group (default: the plugin's)")

    @property
    def label(self) -> str:
        return self.name or self.plugin


class AssembleSpec(Strict):
    """How a node group puts items back together from parts (a frame from its sectors)."""

    key: str = Field(min_length=1, description="header field that identifies an item, e.g. frame_number")
    part: str = Field(min_length=1, description="header field numbering the part, 0..parts-1, e.g. module")
    parts: int = Field(ge=1, le=MAX_PARTS, description="parts per item")
    shape: tuple[int, ...] = Field(description="shape of one part's payload, e.g. [144, 576]")
    dtype: str = Field("uint16", description="numpy dtype of the payload (little-endian)")

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape:
            raise ValueError("a part needs at least one dimension, e.g. [144, 576]")
        if len(shape) > MAX_NDIM:
            raise ValueError(f"{len(shape)} dimensions; at most {MAX_NDIM}")
        bad = [d for d in shape if d < 1]
        if bad:
            raise ValueError(f"every dimension must be at least 1, not {bad[0]}")
        return shape

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        item_dtype(dtype)
        return dtype


def item_dtype(dtype: str):
    """The numpy dtype a part's payload is read as; ValueError unless it is a fixed-size number (or bool)."""
    import warnings

    import numpy as np

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dt = np.dtype(dtype)
    except Exception:  # numpy raises TypeError, ValueError, SyntaxError... for what it cannot parse
        raise ValueError(f"numpy does not know the dtype {dtype!r}; e.g. uint16, int32, float32") from None
    if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None or dt.itemsize < 1:
        raise ValueError(f"dtype {dtype!r} ({dt}) is not a fixed-size number; e.g. uint16, int32, float32")
    return dt


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
    route: str | None = Field(None, min_length=1, description="header field whose value modulo the number of "
                              "downstream replicas picks the one a message goes to")
    assemble: AssembleSpec | None = None
    analyses: list[AnalysisSpec] = Field(default_factory=list)
    workers: int = Field(1, ge=1, le=256, description="node group: threads that run the analyses")
    batch: int = Field(16, ge=1, le=4096, description="node group: items per batch handed to analyses")
    scan_timeout: float = Field(10.0, gt=0, le=24 * HOUR, description="seconds of silence after which a scan is "
                                "finished with what arrived")
    fallback: str | None = Field(None, min_length=1, description="producer: directory for a scan's data when no "
                                 "node group is registered; default: no fallback, wait")
    fallback_wait: float = Field(5.0, ge=0, le=24 * HOUR, description="producer: seconds a scan waits for a node group "
                                 "to register before it goes to `fallback` (in batch runs; a service does not wait)")
    service: bool = Field(False, description="producer: run as a service, sending a scan for each acquisition "
                          "requested while it runs (`zpipe acquire`), until stopped, instead of the source's own scans")
    host: Name = "localhost"
    replicas: int = Field(1, ge=1, le=4096)
    threads: int = Field(1, ge=1, le=1024, description="parallel streams: sending threads, or channels / "
                                                             "receiving sockets (aggregator, node group)")
    sockets: dict[Name, SocketSpec] = Field(default_factory=dict)

    @field_validator("fallback")
    @classmethod
    def _directory(cls, fallback: str | None) -> str | None:
        if fallback is not None and "\0" in fallback:
            raise ValueError("a directory name cannot contain a NUL character")
        return fallback


class HostSpec(Strict):
    """A machine the graph runs on, and the address peers reach it at (never 0.0.0.0).

    The address is fixed (`address: 10.0.0.7`), or found on the machine when it starts (a compute
    node of a batch allocation): `address: auto`, the local IPv4 address that routes toward the
    registry, or `interface: NAME`, that interface's IPv4 address (zpipe.hosts)."""

    address: str = Field("127.0.0.1", description="what peers connect to; `auto`: the address that routes toward "
                         "the registry, found when the host starts")
    interface: str = Field("", description="a network interface whose IPv4 address is the host's, found when it "
                           "starts (instead of `address`)")
    bind: str = Field("", description="interface to bind on; default: the host's address")

    @model_validator(mode="after")
    def _reachable(self) -> "HostSpec":
        if self.address in ("0.0.0.0", "*", "::"):
            raise ValueError("`address` is what peers connect to and must be reachable; put 0.0.0.0 in `bind`")
        if self.interface and "address" in self.model_fields_set:
            raise ValueError("give the host's `address` or the `interface` it is found on, not both")
        return self

    @field_validator("address")
    @classmethod
    def _address(cls, address: str) -> str:
        if address in ("0.0.0.0", "*", "::", AUTO):
            return address  # the wildcards are said better by _reachable, for the host as a whole
        return check_host(address, "address")

    @field_validator("interface")
    @classmethod
    def _interface(cls, interface: str) -> str:
        return interface if interface == "" else check_interface(interface)

    @field_validator("bind")
    @classmethod
    def _bind(cls, bind: str) -> str:
        return bind if bind == "" else check_host(bind, "bind", wildcard=True)

    @property
    def dynamic(self) -> bool:
        """True when the address is known only on the host, when it starts (`auto` or an interface)."""
        return self.address == AUTO or bool(self.interface)


class RegistrySpec(Strict):
    """The one bootstrap address; every other endpoint is found through the registry behind it."""

    host: Name | None = Field(None, description="the host that runs the registry server; default: the first host")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port (only for a single-host run)")
    address: str | None = Field(None, description="an external registry, e.g. tcp://10.0.0.5:5555; no server is started")

    @field_validator("port")
    @classmethod
    def _unprivileged(cls, port: int) -> int:
        if 0 < port < FIXED_PORT_MIN:
            raise ValueError(f"port {port} is privileged (below {FIXED_PORT_MIN}): binding it needs root; "
                             f"pick one in {FIXED_PORT_MIN}-65535, or 0 for any free port")
        return port

    @field_validator("address")
    @classmethod
    def _endpoint(cls, address: str | None) -> str | None:
        if address is None:
            return None
        if address.startswith("ipc://"):
            path = address[len("ipc://"):]
            if not path or "\0" in path or len(path.encode("utf-8", "surrogatepass")) > IPC_PATH_MAX:
                raise ValueError(f"an ipc address needs a path of 1 to {IPC_PATH_MAX} bytes")
            return address
        m = re.fullmatch(r"tcp://(.+):([0-9]{1,5})", address)
        if not m:
            raise ValueError(f"expected tcp://HOST:PORT (or ipc://PATH), got {short(address)}")
        check_host(m.group(1), "the registry's host")
        if not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"port {int(m.group(2))} is out of range 1-65535")
        return address


class StatusSpec(Strict):
    """How often nodes publish their status and counters; 0 turns it off."""

    interval: float = Field(0.5, ge=0, le=60)

    @field_validator("interval")
    @classmethod
    def _not_busy(cls, interval: float) -> float:
        if 0 < interval < 0.01:
            raise ValueError(f"every {interval:g} s would flood the registry; 0 (off) or at least 0.01")
        return interval


Mode = Literal["none", "allow", "curve"]


class SecuritySpec(Strict):
    """Opt-in security (docs/security.md): CURVE keys from `keys`, on the registry and per data link."""

    keys: str = Field(min_length=1, max_length=4096, description="directory of certificates made by `zpipe keys` "
                      "(relative to the topology file)")
    registry: Literal["curve", "none"] = Field("curve", description="the registry's sockets and the results gather: "
                                               "CURVE with ZAP and authorised writes, or none")
    data: Mode = Field("none", description="data links by default: curve (encrypted, authenticated), allow (the "
                       "topology's hosts' addresses only), none")
    links: dict[str, Mode] = Field(default_factory=dict, description="per link, by its binding socket "
                                   "`node.socket`: its mode")

    @field_validator("keys")
    @classmethod
    def _path(cls, keys: str) -> str:
        if "\0" in keys:
            raise ValueError("a directory name cannot contain a NUL character")
        return keys


class Topology(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=100)]
    description: str = ""
    registry: RegistrySpec = RegistrySpec()
    status: StatusSpec = StatusSpec()
    # `security: none` says so explicitly: required to run open across machines (see spans_machines).
    security: SecuritySpec | None = None
    hosts: dict[Name, HostSpec] = Field(default_factory=lambda: {"localhost": HostSpec()})
    nodes: dict[Name, NodeSpec]

    @field_validator("security", mode="before")
    @classmethod
    def _open(cls, v):
        return None if v == "none" else v

    def spans_machines(self) -> list[str]:
        return machines_spanned(self.hosts, self.nodes)

    def hosts_used(self) -> list[str]:
        return sorted({n.host for n in self.nodes.values()})

    def registry_host(self) -> str:
        return self.registry.host or next(iter(self.hosts))


def machines_spanned(hosts: dict[str, HostSpec], nodes: dict[str, NodeSpec]) -> list[str]:
    """The hosts in use when they are not all this machine's loopback (several machines, or one found
    only when it starts); [] otherwise. Such a topology must say `security:` (zpipe.topology.load)."""
    used = sorted({n.host for n in nodes.values() if n.host in hosts})
    if len(used) < 2:
        return []
    local = all(not hosts[h].dynamic and hosts[h].address.startswith("127.") for h in used)
    return [] if local else used
