"""What one node replica needs at run time: its spec, the registry, the pipeline's identity, and its sockets.

Sockets that bind take a free port (unless the topology fixes one) and publish their
reachable address in the registry; sockets that connect find their peers there and follow
them as replicas come and go. Each replica announces itself alive (zpipe.roster) and stamps
every message it sends with the pipeline's id, which the registry holds (`pipeline`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import zmq

from zpipe import wire
from zpipe.kv import KVClient
from zpipe import roster, sessions
from zpipe.registry import Endpoint, Follower, Registry, reachable
from zpipe.status import Meter, Publisher, WarningsToMeter
from zpipe.topology import NodeSpec, SocketSpec, Topology
from zpipe.topology.plan import scan_plan

log = logging.getLogger("zpipe.runtime")

SOCKET_TYPES = {
    "push": zmq.PUSH, "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB, "req": zmq.REQ,
    "rep": zmq.REP, "dealer": zmq.DEALER, "router": zmq.ROUTER, "pair": zmq.PAIR,
}
CLOSE_LINGER_MS = 30_000  # a finished sender waits this long at most for its queue to drain
ABORT_LINGER_MS = 0
MAX_MESSAGE = 1 << 30  # bytes: a receiving socket drops a peer that sends a bigger message part
PIPELINE_KEY = "pipeline"
PIPELINE_WAIT = 10.0


def pipeline_id(kv: KVClient, timeout: float = PIPELINE_WAIT) -> str:
    """The pipeline's identity, as the runner that owns the registry published it."""

    def known(items: dict) -> bool:
        value = items.get(PIPELINE_KEY)
        return isinstance(value, dict) and isinstance(value.get("id"), str)

    try:
        return kv.wait(known, prefix=PIPELINE_KEY, timeout=timeout)[PIPELINE_KEY]["id"]
    except TimeoutError:
        raise RuntimeError(f"the registry at {kv.address} holds no pipeline id (`{PIPELINE_KEY}`) after "
                           f"{timeout:g} s; is it a zpipe run's registry?") from None


@dataclass
class Link:
    """An opened socket and, for the connecting side, the peers it follows."""

    name: str
    spec: SocketSpec
    socket: zmq.Socket
    follower: Follower | None = None
    connected: set[str] = field(default_factory=set)

    def refresh(self) -> bool:
        """Connect to replicas that appeared; True if any did."""
        if self.follower is None:
            return False
        # Peers that leave are never disconnected: a registry resync can report one gone and
        # back, a disconnect would drop what is queued to or from it, and with ZMQ_IMMEDIATE
        # nothing new queues to a dead peer. Reconnect attempts to a dead address cost nothing.
        appeared, _gone = self.follower.changes()
        for ep in appeared:
            if ep.address not in self.connected:
                self.socket.connect(ep.address)
                self.connected.add(ep.address)
        return bool(appeared)


# What a node reads from the store. Not `status/`: every node publishes there a few times a
# second for viewers, and a node that took them all would spend CPU on every other node's status.
NODE_SUBTREES = ("endpoints/", "scans/", "flow/", "totals/", "results/", "failures/", roster.PREFIX, PIPELINE_KEY)


class NodeRuntime:
    def __init__(self, topology: Topology, node: str, replica: int, host: str, registry_address: str,
                 *, output_dir: str = ".", resolve_timeout: float = 30.0, address: str | None = None):
        self.topology, self.name, self.replica, self.host = topology, node, replica, host
        self.spec: NodeSpec = topology.nodes[node]
        self.host_spec = topology.hosts[host]
        self.registry_address = registry_address
        # The address peers reach this host at: the runner's (it resolved `auto` or an interface once), or
        # ours (an MPI rank on a machine of its own); bound on unless the host's `bind` says otherwise.
        if address is None:
            from zpipe.hosts import resolve

            address = resolve(self.host_spec, host, registry_address)
        self.address = address
        self.output_dir = output_dir
        self.resolve_timeout = resolve_timeout
        self.mpi = None  # the MPI communicator when this replica is an MPI rank (see zpipe.mpirun)
        self.stop = threading.Event()
        self.ctx = zmq.Context()
        # A service producer also follows the acquisitions requested (zpipe.acquisitions).
        subtrees = NODE_SUBTREES + (("acquire/", "acquired/") if self.spec.service else ())
        subtrees += ("runners/",) if topology.security else ()  # hosts' addresses, for `data: allow`
        # A replica in a batch job (SLURM_JOB_ID, or ZPIPE_SESSION) says which in its liveness key (zpipe.sessions).
        self.session = sessions.current()
        subtrees += sessions.SUBTREES if self.session else ()
        from zpipe import security

        self.kv = KVClient(registry_address, subtrees, name=f"{node}[{replica}]",
                           curve=security.client_for(topology, node, replica)).start()
        self.registry = Registry(self.kv)
        self.roster = roster.Roster(self.kv)
        self.plan = scan_plan(topology)
        self.label = f"{node}[{replica}]"
        self.pipe = pipeline_id(self.kv)
        roster.announce(self.kv, node, replica, host=host, role=self.spec.role, pipe=self.pipe,
                        **sessions.fields(self.session))
        sessions.record(self.kv, self.session, node, replica, state="joined", host=host, pipe=self.pipe)
        self.kv.delete(f"flow/{node}/{replica}/end")  # a previous process's end is not ours
        self.leave = threading.Event()  # asked to leave gracefully (SIGTERM): finish what was sent, then go
        self.meter = Meter(node, replica, self.spec.role, host, os.getpid())
        self.plane = security.DataPlane(topology, node, self.ctx, extra_addresses=self._peer_addresses,
                                        on_refuse=self.meter.refuse, label=f"{node}[{replica}]")
        logging.getLogger().addHandler(WarningsToMeter(self.meter))
        self.status = Publisher(self.kv, self.meter, topology.status.interval)
        if topology.status.interval > 0:
            self.status.start()
        self.links: dict[str, Link] = {}
        self._published: list[Endpoint] = []
        self._lock = threading.Lock()
        self._sockets: list[zmq.Socket] = []

    # -- sockets -----------------------------------------------------------------------------
    def open(self, sname: str) -> Link:
        """Open the node's socket `sname` as the topology declares it (call from the thread that uses it)."""
        spec = self.spec.sockets[sname]
        sock = self.new_socket(spec)
        link = Link(sname, spec, sock)
        if spec.binds:
            self.plane.secure(sock, self.name, sname, True)
            sock.bind(self._bind_address(sname, spec))
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            ep = Endpoint(self.name, self.replica, sname, reachable(bound, self.address),
                          host=self.host, pid=os.getpid())
            self.registry.publish(ep)
            self._published.append(ep)
            log.debug("%s[%d].%s bound at %s", self.name, self.replica, sname, ep.address)
        else:
            peer_node, _, peer_sock = spec.connect.partition(".")
            self.plane.secure(sock, peer_node, peer_sock, False)
            self.registry.resolve(peer_node, peer_sock, timeout=self.resolve_timeout, stop=self.stop)
            link.follower = self.registry.follow(peer_node, peer_sock)
            link.refresh()
        self.links[sname] = link
        return link

    def bind_per_thread(self, sname: str, thread: int) -> zmq.Socket:
        """Bind thread `thread`'s own copy of socket `sname`, registered as `sname@thread`.

        Roles whose threads each talk to one upstream thread (aggregator, node group) use it;
        the socket belongs to the calling thread and is closed by it.
        """
        spec = self.spec.sockets[sname]
        return self.bind_as(f"{sname}@{thread}", spec.model_copy(update={"port": None}))

    def bind_as(self, name: str, spec: SocketSpec) -> zmq.Socket:
        """A socket bound on any free port and registered under `name` (for the node's own plumbing)."""
        sock = self.new_socket(spec)
        self.plane.secure(sock, self.name, name, True)
        sock.bind(self._bind_address(name, spec))
        ep = Endpoint(self.name, self.replica, name,
                      reachable(sock.getsockopt_string(zmq.LAST_ENDPOINT), self.address),
                      host=self.host, pid=os.getpid())
        self.registry.publish(ep)
        with self._lock:
            self._published.append(ep)
        return sock

    def _peer_addresses(self) -> set[str]:
        """The addresses runners announced for their hosts (`auto`, interfaces): `data: allow` admits them."""
        return {v["address"] for v in self.kv.items("runners/").values()
                if isinstance(v, dict) and isinstance(v.get("address"), str)}

    def new_socket(self, spec: SocketSpec) -> zmq.Socket:
        sock = self.ctx.socket(SOCKET_TYPES[spec.pattern])
        # Bounded, not zero: a socket closed by garbage collection still delivers what is
        # queued. An abort closes everything with linger 0 (see close()).
        sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        with self._lock:
            self._sockets.append(sock)  # live until close(), whoever made it
        sock.setsockopt(zmq.SNDHWM, spec.hwm)
        sock.setsockopt(zmq.RCVHWM, spec.hwm)
        if spec.pattern in ("push", "dealer", "req", "pair"):
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue to a peer that is not connected
        if spec.pattern == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if spec.pattern in ("pull", "sub", "router", "rep", "dealer", "pair"):
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)  # a forged giant part cannot take the memory
        return sock

    def _bind_address(self, sname: str, spec: SocketSpec) -> str:
        if spec.transport == "ipc":
            return f"ipc://{self.output_dir}/{self.name}-{self.replica}-{sname}.sock"
        iface = self.host_spec.bind or self.address
        return f"tcp://{iface}:{spec.port or 0}"

    def send(self, sock: zmq.Socket, msg, refresh=None, peers=()) -> None:
        """Send a message, waiting at the high-water mark (never dropping), bounded by stop and by the
        liveness of the downstream replicas `peers` [(node, replica), ...]: once every one of them is
        gone (zpipe.roster), PeerGone. `refresh` follows peer replicas while we wait (owner thread only).
        """
        from zpipe.transport.outbox import PeerGone

        frames = [wire.pack_header(msg.header)] if msg.payload is None else [wire.pack_header(msg.header), msg.payload]
        looked = time.monotonic()
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
            t0 = time.monotonic()
            sock.poll(100, zmq.POLLOUT)
            self.meter.blocked_s += time.monotonic() - t0
            if self.stop.is_set():
                raise InterruptedError("stopped while sending")
            if time.monotonic() - looked > 0.05:
                looked = time.monotonic()
                if refresh:
                    refresh()
                if peers and all(self.roster.gone(n, r) for n, r in peers):
                    raise PeerGone(", ".join(f"{n}[{r}]" for n, r in peers), "every downstream replica is gone")

    def inputs(self, patterns=("pull", "sub")) -> list[str]:
        return [n for n, s in self.spec.sockets.items() if s.pattern in patterns]

    def outputs(self, patterns=("push", "pub")) -> list[str]:
        return [n for n, s in self.spec.sockets.items() if s.pattern in patterns]

    def refresh(self) -> None:
        for link in self.links.values():
            link.refresh()

    def announce_leaving(self) -> None:
        """Tell the pipeline we are leaving: senders route nothing new to us (zpipe.roster)."""
        roster.announce(self.kv, self.name, self.replica, host=self.host, role=self.spec.role, pipe=self.pipe,
                        leaving=True, **sessions.fields(self.session))
        sessions.record(self.kv, self.session, self.name, self.replica, state="leaving", host=self.host, pipe=self.pipe)

    # -- state in the key-value store --------------------------------------------------------
    def key(self, prefix: str, *rest) -> str:
        return "/".join([prefix, self.name, str(self.replica), *map(str, rest)])

    def close(self, *, drain: bool) -> None:
        """Close sockets; when draining, wait (bounded) for queued messages to reach their peers."""
        # Sockets first, registrations after: peers that see us leave disconnect, and anything
        # still queued to them would be lost if they did so before it was delivered.
        self.status.stop()
        linger = CLOSE_LINGER_MS if drain else ABORT_LINGER_MS
        self.plane.stop()
        # destroy() closes every socket of this context, those threads made included, then
        # returns once queued messages are delivered or the linger ran out.
        self.ctx.destroy(linger=linger)
        for ep in self._published:
            try:
                self.registry.withdraw(ep)
            except Exception:  # the registry may already be gone; its TTL cleans up
                pass
        sessions.record(self.kv, self.session, self.name, self.replica, state="left", host=self.host, pipe=self.pipe)
        self.kv.close()

