"""Keys, authentication and authorised writes (issue 12; docs/security.md).

Opt-in through a topology's `security:` section; without one nothing here is used and every
socket is what it was (no CURVE, no ZAP, no check of writes).

* Keys: `zpipe keys DIR` makes one CURVE certificate pair per identity, pyzmq's format:
  `NAME.key` (public, 0644) and `NAME.key_secret` (secret, 0600). Identities: `registry` (the
  registry server, and the runner and accountant in its process), `runner` (runners on other
  hosts), `operator` (`zpipe status`, `zpipe acquire`), one per topology node (`NODE`: its data
  sockets, shared by its replicas) and one per replica (`NODE.R`: what replica R writes to the
  registry). A secret key file that group or others may read is refused, naming the file.
* Authentication: every socket that binds under CURVE is a CURVE server whose ZAP handler
  (`Zap`, one per ZeroMQ context) accepts exactly the public keys of the key directory; the
  User-Id of an accepted peer is its identity's name. Under `allow` the handler accepts NULL
  connections from the topology's hosts' addresses only. A rejected handshake is counted and
  logged (once per peer address and key) with the peer's address and public key, never a secret.
* Authorisation: `Policy` says which keys each identity may write, from how zpipe writes them
  (a node replica: its own endpoint, liveness, status, count and result keys; scan records only
  by the roles that own them). The registry server applies it to every write (kv/server.py).
  A replica with a key of its own (`NODE.R`) writes as it, and may write only replica R's keys;
  the node's shared key then writes nothing. A key directory made before replica keys existed
  (no `NODE.R`) keeps the node-wide rule: any replica of NODE may write any of NODE's keys.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import logging
import os
import re
import socket as _socket
import stat
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import zmq
from zmq.utils import z85

log = logging.getLogger("zpipe.security")

PUBLIC_EXT = ".key"
SECRET_EXT = ".key_secret"
REGISTRY = "registry"  # the registry server; also the runner and accountant beside it (they hold its secret)
RUNNER = "runner"  # runners on other hosts
OPERATOR = "operator"  # zpipe status, zpipe acquire
SPECIAL = (REGISTRY, RUNNER, OPERATOR)
IDENTITY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}(?:\.\d{1,4})?$")  # NODE, or NODE.R: replica R of NODE

MODES = ("none", "allow", "curve")
CURVE_DOMAIN = b"zpipe-curve"
ALLOW_DOMAIN = b"zpipe-allow"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DENIED_PREFIX = "security/denied/"  # the registry's count of refused writes, per identity
HANDSHAKES_KEY = "security/handshakes"  # the registry's count of refused handshakes


class SecurityError(Exception):
    """A key that cannot be used (missing, malformed, or its secret readable by others): one line."""


# -- key files --------------------------------------------------------------------------------

_SECRET_BANNER = """#   ****  Generated on {0} by zpipe keys (pyzmq format)  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {0} by zpipe keys (pyzmq format)  ****
#   ZeroMQ CURVE Public Certificate

"""


def _write(path: str, banner: str, public: bytes, secret: bytes | None, mode: int) -> None:
    text = banner.format(datetime.datetime.now()) + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    tmp = f"{path}.tmp{os.getpid()}"
    # Created with its final mode: a secret is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def create(directory: str, names: Iterable[str], *, force: bool = False) -> list[tuple[str, str]]:
    """Make a certificate pair for each identity in `names` that has none (all of them with `force`).
    Returns [(name, "created" | "kept")]."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    done = []
    for name in dict.fromkeys(names):
        if not IDENTITY.match(name):
            raise SecurityError(f"{name!r} is not an identity name (letters, digits, _ and -, at most 64)")
        pub, sec = (os.path.join(directory, name + ext) for ext in (PUBLIC_EXT, SECRET_EXT))
        if not force and os.path.exists(pub) and os.path.exists(sec):
            done.append((name, "kept"))
            continue
        public, secret = zmq.curve_keypair()
        _write(sec, _SECRET_BANNER, public, secret, 0o600)
        _write(pub, _PUBLIC_BANNER, public, None, 0o644)
        done.append((name, "created"))
    return done


def _read(path: str) -> tuple[bytes, bytes | None]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 << 10)
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read key file: {exc.strerror or exc}") from None
    found = {}
    for line in text.splitlines():
        m = re.match(r'\s*(public-key|secret-key)\s*=\s*"([^"]*)"\s*$', line)
        if m:
            found[m.group(1)] = m.group(2).encode()
    public = found.get("public-key")
    if public is None or len(public) != 40:
        raise SecurityError(f"{path}: not a CURVE certificate (no 40-character public-key)")
    secret = found.get("secret-key")
    if secret is not None and len(secret) != 40:
        raise SecurityError(f"{path}: malformed secret-key (not 40 characters)")
    return public, secret


def check_private(path: str) -> None:
    """Refuse a secret key file that group or others may read or write (acceptance 4)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read secret key file: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise SecurityError(f"{path}: secret key file is accessible by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}); refused: `chmod 600 {path}`")


def load_public(directory: str, name: str) -> bytes:
    return _read(os.path.join(directory, name + PUBLIC_EXT))[0]


def load_secret(directory: str, name: str) -> tuple[bytes, bytes]:
    """(public, secret) of identity `name`, z85; SecurityError if its secret file is loose or missing."""
    path = os.path.join(directory, name + SECRET_EXT)
    check_private(path)
    public, secret = _read(path)
    if secret is None:
        raise SecurityError(f"{path}: no secret-key in this file")
    return public, secret


def public_keys(directory: str) -> dict[bytes, str]:
    """Every public key of the directory -> its identity (the file's name): who may connect."""
    try:
        files = sorted(os.listdir(directory))
    except OSError as exc:
        raise SecurityError(f"{directory}: cannot list key directory: {exc.strerror or exc}") from None
    keys: dict[bytes, str] = {}
    for f in files:
        if f.endswith(PUBLIC_EXT) and IDENTITY.match(f[:-len(PUBLIC_EXT)]):
            keys[z85.decode(_read(os.path.join(directory, f))[0])] = f[:-len(PUBLIC_EXT)]
    return keys


def listing(directory: str) -> list[dict]:
    """What `zpipe keys DIR` lists: each identity, its public key, and its secret file's state."""
    rows = []
    for f in sorted(os.listdir(directory)):
        if not f.endswith(PUBLIC_EXT):
            continue
        name = f[:-len(PUBLIC_EXT)]
        row = {"identity": name, "public": "", "secret": "absent"}
        try:
            row["public"] = _read(os.path.join(directory, f))[0].decode()
        except SecurityError as exc:
            row["public"] = f"BROKEN: {exc}"
        sec = os.path.join(directory, name + SECRET_EXT)
        if os.path.exists(sec):
            try:
                check_private(sec)
                row["secret"] = "0600"
            except SecurityError:
                row["secret"] = f"LOOSE ({stat.S_IMODE(os.stat(sec).st_mode):04o})"
        rows.append(row)
    return rows


def replica_identity(node: str, replica: int) -> str:
    return f"{node}.{replica}"


def replica_identities(replicas: dict[str, int]) -> list[str]:
    """`NODE.R` for every replica R of each node, from {node: its number of replicas}."""
    return [replica_identity(n, r) for n, count in replicas.items() for r in range(count)]


def identities(topology) -> list[str]:
    """The identities a topology needs keys for: the special ones, each node's, each replica's."""
    return [*SPECIAL, *topology.nodes, *replica_identities({n: s.replicas for n, s in topology.nodes.items()})]


# -- credentials ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """One identity's key pair and the key of the server it talks to (z85 bytes); a client's view."""

    public: bytes
    secret: bytes
    server: bytes

    def client(self, sock: zmq.Socket, server: bytes | None = None) -> None:
        """Make `sock` a CURVE client of `server` (default: the registry); before it connects."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server or self.server

    def serve(self, sock: zmq.Socket, domain: bytes = CURVE_DOMAIN) -> None:
        """Make `sock` a CURVE server with our key, authenticated by the context's ZAP handler; before it binds."""
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = domain


def credentials(directory: str, identity: str) -> Curve:
    """`identity`'s keys and the registry's public key, from `directory`."""
    public, secret = load_secret(directory, identity)
    return Curve(public, secret, load_public(directory, REGISTRY))


def registry_identity(topology, identity: str, replica: int | None = None) -> str:
    """Who `identity` (a node: replica `replica` of it) is to the registry: `NODE.R` if that replica has a key
    of its own in the key directory (its public key, as the registry sees the directory: its secret must then
    be here too), else `identity`."""
    if replica is not None:
        own = replica_identity(identity, replica)
        if os.path.exists(os.path.join(topology.security.keys, own + PUBLIC_EXT)):
            return own
    return identity


def client_for(topology, identity: str, replica: int | None = None) -> Curve | None:
    """The credentials a client of this topology's registry uses, or None (no `security:`, or registry: none).
    A node's replica passes its number: it uses its own key when it has one (`registry_identity`)."""
    sec = getattr(topology, "security", None)
    if sec is None or sec.registry != "curve":
        return None
    return credentials(sec.keys, registry_identity(topology, identity, replica))


def secrets_needed(topology, node: str, replica: int) -> list[str]:
    """The identities whose secret a replica of `node` must hold on its host: its registry identity (under
    `registry: curve`) and its node's (when one of its data links is under CURVE)."""
    sec = getattr(topology, "security", None)
    if sec is None:
        return []
    needed = [registry_identity(topology, node, replica)] if sec.registry == "curve" else []
    spec = topology.nodes[node]
    links = [(node, s) for s, sock in spec.sockets.items() if sock.binds]
    links += [tuple(sock.connect.split(".", 1)) for sock in spec.sockets.values() if not sock.binds]
    links += [(node, base) for base in CONTROL_SOCKETS if spec.role == "nodegroup"]  # the results gather
    if any(link_mode(topology, n, s) == "curve" for n, s in links if n in topology.nodes) and node not in needed:
        needed.append(node)
    return needed


class LooseKey(SecurityError, RuntimeError):
    """A SecurityError the commands that connect to a registry report as one line (they catch RuntimeError)."""


def operator_curve(directory: str | None, identity: str = OPERATOR) -> Curve | None:
    """`zpipe status --keys DIR`, `zpipe acquire --keys DIR`: the operator's credentials, or None."""
    if not directory:
        return None
    try:
        return credentials(directory, identity)
    except SecurityError as exc:
        raise LooseKey(str(exc)) from None


# -- authorisation ----------------------------------------------------------------------------

# Keys every node replica writes, under its own node name and its replica number (see roster.py,
# registry.py, status.py, flow.py, node.py, roles/stage.py, sessions.py).
_OWN = ("endpoints", "nodes", "status", "flow", "totals", "failures", "results", "sessions")
# Keys by role (scans/record.py, roles/producer, roles/nodegroup, preview.py, acquisitions.py); {replica}
# is the writer's replica number where the key carries it.
_BY_ROLE = {
    "producer": (r"scans/\d+", r"scans/\d+/fallback/{node}/{replica}/[^/]+", r"acquired/[^/]+"),
    "nodegroup": (r"scans/\d+/part/{replica}", r"scans/\d+/output/[^/]+", r"preview/\d+/[^/]+/{replica}"),
}
_SPECIAL_RULES = {
    REGISTRY: (r".*",),  # the server's process: pipeline id, scan records, reports (accountant)
    RUNNER: (r"runners/[^/]+/\d+",),
    OPERATOR: (r"acquire/[^/]+",),
}


class Policy:
    """Which keys each identity may write (and delete): identity name -> one anchored regex."""

    def __init__(self, rules: dict[str, re.Pattern]):
        self.rules = rules

    @classmethod
    def for_topology(cls, topology, known: Iterable[str] = ()) -> "Policy":
        """`known`: the identities of the key directory. A node with replica keys among them (`NODE.R`)
        writes through those, each its own replica's keys only; the node's shared key writes nothing."""
        known = set(known)
        rules: dict[str, list[str]] = {k: list(v) for k, v in _SPECIAL_RULES.items()}

        def own(n: str, replica: str, role: str) -> list[str]:
            return [rf"(?:{'|'.join(_OWN)})/{n}/{replica}(?:/.*)?",
                    *(r.format(node=n, replica=replica) for r in _BY_ROLE.get(role, ()))]

        for name, spec in topology.nodes.items():
            n = re.escape(name)
            mine = [k for k in known if k.startswith(name + ".") and k[len(name) + 1:].isdigit()]
            for ident in mine:
                rules[ident] = own(n, str(int(ident[len(name) + 1:])), spec.role)
            rules[name] = rules.get(name, []) + ([] if mine else own(n, r"\d+", spec.role))
        return cls({k: re.compile("(?:" + "|".join(v) + r")\Z", re.DOTALL) for k, v in rules.items() if v})

    def allows(self, identity: str, key: str) -> bool:
        rule = self.rules.get(identity)
        return rule is not None and rule.match(key) is not None


# -- ZAP --------------------------------------------------------------------------------------

class Zap:
    """A ZAP handler for one ZeroMQ context (RFC 27): CURVE peers whose key is known, NULL peers
    from allowed addresses. Every refusal is counted (`rejected`, by reason) and logged once per
    peer address and key; what is logged is public (an address, a public key)."""

    def __init__(self, ctx: zmq.Context, *, keys: dict[bytes, str] | None = None,
                 allow: Callable[[], set[str]] | None = None, label: str = "zpipe",
                 domains: dict[bytes, frozenset[str]] | None = None, on_refuse: Callable[[], None] | None = None):
        self.ctx, self.keys, self.allow, self.label = ctx, keys or {}, allow, label
        # A CURVE domain listed here admits only these identities (a data link: the nodes that send on it).
        self.domains = domains if domains is not None else {}
        self.on_refuse = on_refuse
        self.accepted: Counter = Counter()
        self.rejected: Counter = Counter()
        self.last: dict | None = None  # the last refusal: {"address", "key", "reason"}
        self._logged: set = set()
        self._watch: collections.deque = collections.deque()  # (monitor endpoint, what) for our thread to read
        self._watched = itertools.count()
        self._stop = threading.Event()
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)  # before any socket of the context binds: no unauthenticated window
        self._thread = threading.Thread(target=self._run, name=f"zap-{label}", daemon=True)
        self._thread.start()

    def stop(self, leave_open: bool = False) -> None:
        """Stop answering. `leave_open`: the socket stays bound, unanswered, until its context is destroyed:
        a handshake begun meanwhile waits for a reply that never comes (refused), never falls through to
        libzmq's "no ZAP handler: accept"."""
        self._leave_open = leave_open
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def watch(self, sock: zmq.Socket, what: str) -> None:
        """Also count the handshakes that fail on `sock` before they reach ZAP (a peer without CURVE, or with
        CURVE on an `allow` link): its monitor events, read by our thread. Call from `sock`'s thread."""
        endpoint = f"inproc://zpipe-handshakes-{id(self):x}-{next(self._watched)}-{what}"  # unique per socket
        sock.monitor(endpoint, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._watch.append((endpoint, what))

    def _run(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        monitors: dict[zmq.Socket, str] = {}
        try:
            while not self._stop.is_set():
                while self._watch:
                    endpoint, what = self._watch.popleft()
                    mon = self.ctx.socket(zmq.PAIR)
                    mon.linger = 0
                    mon.connect(endpoint)
                    monitors[mon] = what
                    poller.register(mon, zmq.POLLIN)
                events = dict(poller.poll(100))
                for mon, what in monitors.items():
                    if mon in events:
                        while True:
                            try:
                                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
                            except zmq.Again:
                                break
                            if event["event"] & (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                                self._refuse(b"", "", "", f"no CURVE handshake ({what})")
                if sock not in events:
                    continue
                msg = sock.recv_multipart()
                try:
                    reply = self.answer(msg)
                except Exception:  # never leave a handshake unanswered
                    log.exception("%s: ZAP handler failed on a request", self.label)
                    reply = [b"1.0", msg[1] if len(msg) > 1 else b"", b"500", b"internal error", b"", b""]
                sock.send_multipart(reply)
        except zmq.ZMQError:
            pass  # the context is being destroyed
        finally:
            if not getattr(self, "_leave_open", False):
                sock.close(linger=0)
                for mon in monitors:
                    mon.close(linger=0)

    def answer(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6 or msg[0] != b"1.0":
            return [b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"bad ZAP request", b"", b""]
        _version, request_id, domain, address, _routing, mechanism, *creds = msg
        addr = address.decode(errors="replace")
        if mechanism == b"CURVE" and len(creds) == 1 and len(creds[0]) == 32:
            name = self.keys.get(creds[0])
            allowed = self.domains.get(domain)
            if name is not None and allowed is not None and name not in allowed:
                return self._refuse(request_id, addr, z85.encode(creds[0]).decode(),
                                    f"identity {name!r} does not send on {domain.decode(errors='replace')}")
            if name is not None:
                self.accepted[name] += 1
                return [b"1.0", request_id, b"200", b"OK", name.encode(), b""]
            return self._refuse(request_id, addr, z85.encode(creds[0]).decode(), "unknown CURVE key")
        if mechanism == b"NULL" and domain == ALLOW_DOMAIN and self.allow is not None:
            if addr in self.allow():
                self.accepted[addr] += 1
                return [b"1.0", request_id, b"200", b"OK", addr.encode(), b""]
            return self._refuse(request_id, addr, "", "address not in the topology's hosts")
        return self._refuse(request_id, addr, "", f"mechanism {mechanism.decode(errors='replace')} not allowed")

    def _refuse(self, request_id: bytes, addr: str, key: str, reason: str) -> list[bytes]:
        self.rejected[reason] += 1
        self.last = {"address": addr, "key": key, "reason": reason}
        if self.on_refuse is not None:
            self.on_refuse()
        if (addr, key, reason) not in self._logged and len(self._logged) < 1000:
            self._logged.add((addr, key, reason))
            log.warning("%s refused a connection from %s%s: %s; further ones from it are only counted",
                        self.label, addr or "a peer (address not known before its handshake)",
                        f" (public key {key})" if key else "", reason)
        return [b"1.0", request_id, b"400", reason.encode(), b"", b""]


@dataclass
class ServerAuth:
    """What a registry server needs under CURVE: its keys, who may connect, who may write what."""

    public: bytes
    secret: bytes
    keys: dict[bytes, str]
    policy: Policy
    zap: Zap | None = None
    denied: dict[str, dict] = field(default_factory=dict)  # identity -> {"writes", "last_key", "reason"}

    def serve(self, sock: zmq.Socket) -> None:
        Curve(self.public, self.secret, self.public).serve(sock)


def server_auth(topology) -> ServerAuth | None:
    """The registry server's side of `security:` (None without it, or with `registry: none`)."""
    sec = getattr(topology, "security", None)
    if sec is None or sec.registry != "curve":
        return None
    public, secret = load_secret(sec.keys, REGISTRY)
    keys = public_keys(sec.keys)
    return ServerAuth(public, secret, keys, Policy.for_topology(topology, keys.values()))


# -- the data plane ---------------------------------------------------------------------------

CONTROL_SOCKETS = ("results",)  # a node's own plumbing that is control plane (zpipe.gather): the registry's mode


def link_mode(topology, node: str, socket: str) -> str:
    """`none`, `allow` or `curve` for the link whose binding socket is `node.socket` (`data@3` is `data`)."""
    sec = getattr(topology, "security", None)
    if sec is None:
        return "none"
    base = socket.partition("@")[0]
    if base in CONTROL_SOCKETS and base not in topology.nodes[node].sockets:
        return "curve" if sec.registry == "curve" else "none"
    return sec.links.get(f"{node}.{base}", sec.data)


def senders(topology, node: str, base: str) -> frozenset[str]:
    """The nodes that connect to `node.base` (the identities a CURVE link admits); the node itself for its
    own plumbing (the results gather between its replicas)."""
    if base in CONTROL_SOCKETS and base not in topology.nodes[node].sockets:
        return frozenset({node})
    target = f"{node}.{base}"
    return frozenset(n for n, spec in topology.nodes.items() if any(s.connect == target for s in spec.sockets.values()))


class DataPlane:
    """One node process's side of `security:` on its data sockets (zpipe.runtime, zpipe.transport.outbox).

    `secure(sock, node, socket, binds)` before a socket binds or connects: under `curve` the binding
    side is a CURVE server with its node's key that admits only the nodes that send on that link, the
    connecting side a client that knows the binding node's public key; under `allow` the binding side
    admits connections from the topology's hosts' addresses only (ZAP, no per-byte cost); `none`:
    nothing. The ZAP handler starts with the first binding socket that needs it."""

    def __init__(self, topology, identity: str, ctx: zmq.Context, *, extra_addresses: Callable[[], set[str]] | None = None,
                 on_refuse: Callable[[], None] | None = None, label: str = ""):
        self.topology, self.identity, self.ctx = topology, identity, ctx
        self.extra, self.on_refuse, self.label = extra_addresses, on_refuse, label or identity
        self.zap: Zap | None = None
        self._lock = threading.Lock()
        self._curve: Curve | None = None
        self._servers: dict[str, bytes] = {}  # node -> its public key (what a client of its sockets checks)
        self._static: set[str] | None = None

    @property
    def on(self) -> bool:
        return getattr(self.topology, "security", None) is not None

    def secure(self, sock: zmq.Socket, node: str, socket: str, binds: bool) -> str:
        if not self.on:
            return "none"
        mode = link_mode(self.topology, node, socket)
        if mode == "none":
            return mode
        base = socket.partition("@")[0]
        if binds:
            self._start_zap()
            if mode == "curve":
                self._mine().serve(sock, domain=f"zpipe-link:{node}.{base}".encode())
            else:
                sock.zap_domain = ALLOW_DOMAIN
            self.zap.watch(sock, f"{node}.{base}")
        elif mode == "curve":
            server = self._servers.get(node)
            if server is None:
                server = self._servers[node] = load_public(self.topology.security.keys, node)
            self._mine().client(sock, server=server)
        return mode

    def _mine(self) -> Curve:
        if self._curve is None:
            self._curve = credentials(self.topology.security.keys, self.identity)
        return self._curve

    def _allowed(self) -> set[str]:
        if self._static is None:
            self._static = host_addresses(self.topology)
        extra = set()
        if self.extra is not None:
            try:
                extra = self.extra()
            except Exception:
                log.exception("%s: the allow-list's addresses from the registry failed", self.label)
        return self._static | extra

    def _start_zap(self) -> None:
        with self._lock:
            if self.zap is not None:
                return
            keys = public_keys(self.topology.security.keys)
            domains = {}
            for node, spec in self.topology.nodes.items():
                for base in [*spec.sockets, *CONTROL_SOCKETS]:
                    domains[f"zpipe-link:{node}.{base}".encode()] = senders(self.topology, node, base)
            self.zap = Zap(self.ctx, keys=keys, allow=self._allowed, domains=domains, on_refuse=self.on_refuse,
                           label=f"{self.label}'s data sockets")

    def stop(self) -> None:
        """Before the context is destroyed (which closes the handler's socket with the others)."""
        if self.zap is not None:
            self.zap.stop(leave_open=True)


def host_addresses(topology, extra: Iterable[str] = ()) -> set[str]:
    """The topology's hosts' addresses as IPv4 strings (names resolved), plus `extra` and loopback."""
    out = {"127.0.0.1", *extra}
    for hs in topology.hosts.values():
        if hs.address and hs.address != "auto":
            try:
                out.add(_socket.gethostbyname(hs.address))
            except OSError:
                log.warning("host address %r does not resolve; not in the allow-list", hs.address)
    return out


def check(report, top, nodes: dict, base_dir: str) -> None:
    """Whole-file checks of `security:` (the schema is the model's): links name binding sockets, the key
    directory exists and holds every identity's public key. Problems positioned like the rest."""
    sec = getattr(top, "security", None)
    if sec is None:
        return
    for name in nodes:
        if name in SPECIAL:  # its key would be that identity's: a node named `registry` could write anything
            report.add(("nodes", name), f"node {name!r} has the name of one of security's own identities "
                       f"({', '.join(SPECIAL)}); rename it", at_key=True)
    for link in sec.links:
        node, _, sock = link.partition(".")
        spec = nodes.get(node)
        if spec is None or sock not in spec.sockets:
            report.add(("security", "links", link), f"{link!r} is not a socket of the topology (`node.socket`)",
                       at_key=True)
        elif not spec.sockets[sock].binds:
            report.add(("security", "links", link), f"{link!r} connects; name the socket that binds "
                       f"({spec.sockets[sock].connect}): a link's mode is set where it binds", at_key=True)
    if sec.registry == "curve" and top.registry.address:
        report.add(("security", "registry"), f"`registry: curve` needs the pipeline's own registry, but "
                   f"`registry.address` names an external one ({top.registry.address}) that cannot check its "
                   f"writers' keys; place the registry on a host (`registry: {{host: H, port: P}}`), or say "
                   f"`registry: none` here to leave the registry open")
    directory = sec.keys if os.path.isabs(sec.keys) else os.path.join(base_dir, sec.keys)
    if not os.path.isdir(directory):
        report.add(("security", "keys"), f"key directory {directory!r} does not exist; make it with "
                   f"`zpipe keys {sec.keys} --topology FILE`")
        return
    replicas = replica_identities({n: spec.replicas for n, spec in nodes.items()})
    for n in [*SPECIAL, *nodes, *replicas]:  # the secrets this host holds (another host may hold others)
        path = os.path.join(directory, n + SECRET_EXT)
        if os.path.exists(path):
            try:
                check_private(path)
            except SecurityError as exc:
                report.add(("security", "keys"), str(exc))
    missing = [n for n in [*SPECIAL, *nodes] if not os.path.exists(os.path.join(directory, n + PUBLIC_EXT))]
    if missing:
        report.add(("security", "keys"), f"no public key for {', '.join(missing)} in {directory!r}; "
                   f"`zpipe keys {sec.keys} --topology FILE` makes the missing ones")
