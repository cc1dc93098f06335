"""Where a host is reached: its address as the topology gives it, or found when it starts.

A host's address is fixed (`address: 10.0.0.7`), or known only on the machine itself, when it
starts (a compute node of a batch allocation):

* `address: auto`: the local IPv4 address that routes toward the registry (the kernel's choice
  of source address for a datagram sent there; a UDP socket's `connect` sends nothing);
* `interface: ib0`: the IPv4 address of that network interface (the SIOCGIFADDR ioctl).

`zpipe run` resolves it once and hands the address to its node processes (`--address`); a node
started without it (an MPI rank, on a machine of its own) resolves it itself.
"""

from __future__ import annotations

import fcntl
import socket
import struct

from zpipe.topology.model import HostSpec, Topology

SIOCGIFADDR = 0x8915  # linux/sockios.h
IFNAMSIZ = 16


class AddressError(Exception):
    """A host's address cannot be found here; the message says what to fix."""


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = struct.pack("256s", name.encode()[:IFNAMSIZ - 1])
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                raise AddressError(f"no network interface named {name!r} on this machine") from None
            if exc.errno == 99:  # EADDRNOTAVAIL
                raise AddressError(f"network interface {name!r} has no IPv4 address") from None
            raise AddressError(f"cannot read the IPv4 address of interface {name!r}: {exc.strerror or exc}") from None
    return socket.inet_ntoa(res[20:24])


def route_source(target: str, port: int = 9) -> str:
    """The local IPv4 address the kernel would send from toward `target` (a host name or IPv4 address).

    Nothing is sent: connecting a UDP socket only picks the route."""
    try:
        infos = socket.getaddrinfo(target, port, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        raise AddressError(f"cannot resolve {target!r}: {exc.strerror or exc}") from None
    if not infos:
        raise AddressError(f"{target!r} has no IPv4 address")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(infos[0][4])
        except OSError as exc:
            raise AddressError(f"no route from this machine to {target!r}: {exc.strerror or exc}") from None
        return s.getsockname()[0]


def registry_target(registry: str | None) -> str:
    """The host part of a registry endpoint (tcp://HOST:PORT); 127.0.0.1 for ipc/inproc or none."""
    if not registry or not registry.startswith("tcp://"):
        return "127.0.0.1"
    host = registry[len("tcp://"):].rpartition(":")[0]
    return host.strip("[]") or "127.0.0.1"


def describe(spec: HostSpec) -> str:
    """How a host's address is given, for messages: `address: auto`, `interface: eth0` or the address."""
    if spec.interface:
        return f"interface: {spec.interface}"
    return f"address: {spec.address}"


def resolve(spec: HostSpec, host: str, registry: str | None) -> str:
    """The concrete address of host `host` (this machine), given the registry's endpoint (for `auto`)."""
    try:
        if spec.interface:
            return interface_address(spec.interface)
        if spec.address == "auto":
            if registry is None:
                raise AddressError("`address: auto` is the address that routes toward the registry, and this "
                                   "host runs the registry itself; give it a fixed `address` or an `interface`")
            return route_source(registry_target(registry))
    except AddressError as exc:
        raise AddressError(f"host {host!r} ({describe(spec)}): {exc}") from None
    return spec.address


def registry_from_topology(topology: Topology) -> str:
    """The registry's address as every host can derive it from the topology: `tcp://{address}:{port}` of the
    registry's host. AddressError, saying what to fix, when the topology does not fix both."""
    rh = topology.registry_host()
    spec = topology.hosts[rh]
    if topology.registry.port == 0:
        raise AddressError(f"the registry runs on host {rh!r} on any free port (`registry.port` is 0), which other "
                           f"hosts cannot know: set `registry.port` in the topology (e.g. 5555), or give the "
                           f"registry's address with --registry")
    if spec.dynamic:
        raise AddressError(f"the registry runs on host {rh!r}, whose address is known only when it starts "
                           f"({describe(spec)}): give that host a fixed `address` in the topology, or give the "
                           f"registry's address with --registry")
    return f"tcp://{spec.address}:{topology.registry.port}"
