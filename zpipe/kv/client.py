"""A client's replica of the key-value store, kept in step with the server.

Every zpipe node needs a consistent, live view of shared state (who is running,
where its sockets are) without asking the server on each read. The client follows
the Clone pattern: subscribe to updates first, then take a snapshot, then apply
only updates newer than the snapshot. It re-synchronises by snapshot whenever it
sees a sequence gap, loses the server's heartbeat, loses its connection, or meets
a new server (epoch). Keys it sets are *owned*: it refreshes the ephemeral ones
before their TTL runs out and re-publishes all of them to a restarted server. An
ephemeral key stays ours until we delete it: if another client overwrites or
deletes it, we write it again at once (``restored``); a plain key belongs to
whoever wrote it last (see agent.py).

Malformed messages from the server (or anything posing as it) are dropped and
counted in ``rejected``; they never stop the agent.

ZeroMQ sockets are not thread-safe, so one agent thread (agent.py) owns them all;
the public methods hand commands to it through a deque plus a wake-up socketpair.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from . import protocol as p
from .agent import Agent

log = logging.getLogger(__name__)

_MISSING = object()


class KVClient:
    """A live, local copy of the subtrees ``subtrees`` of the store at ``address``."""

    def __init__(
        self,
        address: str,
        subtrees: Sequence[str] = ("",),
        *,
        heartbeat_timeout: float = 3.0,
        name: str = "",
        connect_timeout: float = 10.0,
        curve=None,
    ):
        if isinstance(subtrees, str):
            subtrees = (subtrees,)
        self.address = address
        self.subtrees: tuple[str, ...] = tuple(dict.fromkeys(subtrees)) or ("",)
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.name = name or f"kv-client-{os.getpid()}"
        # zpipe.security.Curve: this client's key pair and the server's public key (a secured
        # topology); None: plain sockets, as before.
        self.curve = curve
        # Marks our own writes in the update stream (ownership, see Agent.on_update).
        self.client_id = uuid.uuid4().bytes[:8]
        self.resyncs = 0  # snapshots taken after the first one
        self.synced_at = 0.0  # monotonic time of the last snapshot installed (keys may be missing just after)
        self.started_at = time.monotonic()
        self._agent = None
        # Malformed messages dropped, by reason; and how often we put back each
        # ephemeral key of ours that another client overwrote or deleted. Both
        # written by the agent thread only.
        self.rejected: dict[str, int] = {}
        self.restored: dict[str, int] = {}
        self.epoch: str | None = None

        self._cond = threading.Condition()
        self._state: dict[str, Any] = {}
        self._seq = 0
        self._version = 0  # bumped on every change, for wait()
        self._callbacks: list[Callable[[str, Any], None]] = []
        self._commands: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._synced = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "KVClient":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._agent_main, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.connect_timeout
        while not self._synced.wait(0.05):
            if not self._thread.is_alive():
                self.close(withdraw=False)
                raise RuntimeError(f"KV client for {self.address} failed") from self._error
            if time.monotonic() >= deadline:
                self.close(withdraw=False)
                raise TimeoutError(
                    f"no answer from KV server at {self.address} "
                    f"within {self.connect_timeout:g} s"
                    + (" (CURVE: the server refuses a key not in its key directory, and a server whose key "
                       "is not the registry's is not answered)" if self.curve is not None else "")
                )
        return self

    def close(self, withdraw: bool = True) -> None:
        """Stop the agent. ``withdraw`` deletes the ephemeral keys we own at once
        (a clean exit); ``withdraw=False`` leaves them to expire, like a crash."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._commands.append(("close", withdraw))
            self._wake()
            if threading.current_thread() is self._thread:
                return  # closed from a callback: the agent ends after it returns
            self._thread.join(timeout=10)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "KVClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _agent_main(self) -> None:
        agent = self._agent = Agent(self)
        try:
            agent.run()
        except BaseException as exc:
            self._error = exc
            log.exception("KV client %s stopped on an error", self.name)
        finally:
            agent.shutdown()

    # -- writes (any thread) ---------------------------------------------------

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` (we then own it). With ``ttl`` the key is ephemeral: the
        server deletes it ``ttl`` seconds after our last refresh."""
        _check_key(key)
        if ttl is not None:
            if not isinstance(ttl, numbers.Real) or isinstance(ttl, bool):
                raise TypeError(f"ttl must be a number of seconds, got {ttl!r}")
            ttl = float(ttl)
            if not (math.isfinite(ttl) and 0 < ttl <= p.MAX_TTL):
                raise ValueError(f"ttl must be in (0, {p.MAX_TTL:g}] seconds, got {ttl}")
        body = p.pack(value)  # here: errors reach the caller
        if len(body) > p.MAX_BODY:
            raise ValueError(f"value of {key!r} is {len(body)} bytes packed, over {p.MAX_BODY}")
        self._command(("set", key, body, ttl))

    def delete(self, key: str) -> None:
        _check_key(key)
        self._command(("delete", key))

    def _command(self, cmd: tuple) -> None:
        if self._closed:
            raise RuntimeError(f"KV client {self.name} is closed")
        self._commands.append(cmd)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full, so the agent has a wake-up pending anyway
        except OSError:
            pass  # closed

    # -- reads (any thread) ----------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        with self._cond:
            return self._state.get(key, default)

    def items(self, prefix: str = "") -> dict[str, Any]:
        """A copy of the keys under ``prefix`` (values are shared: do not mutate them)."""
        with self._cond:
            return self._items(prefix)

    def _items(self, prefix: str) -> dict[str, Any]:
        if not prefix:
            return dict(self._state)
        return {k: v for k, v in self._state.items() if k.startswith(prefix)}

    STOP_CHECK = 0.1  # s between looks at a wait's `stop` event

    def wait(
        self, predicate: Callable[[dict], bool], prefix: str = "", timeout: float = 10.0,
        stop: threading.Event | None = None,
    ) -> dict:
        """Block until ``predicate(items(prefix))`` holds; return those items. TimeoutError after
        ``timeout``; InterruptedError as soon as ``stop`` (if given) is set: a replica asked to stop
        while it waits for a peer stops then, not at the end of the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                view, version = self._items(prefix), self._version
            if predicate(view):  # outside the lock: user code must not stall the agent
                return view
            with self._cond:
                while self._version == version:
                    if stop is not None and stop.is_set():
                        raise InterruptedError(f"stopped while waiting on the registry (prefix {prefix!r})")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"KV condition not met within {timeout:g} s "
                            f"(server {self.address}, prefix {prefix!r}, {len(view)} keys)"
                        )
                    self._cond.wait(remaining if stop is None else min(remaining, self.STOP_CHECK))

    def on_change(self, callback: Callable[[str, Any], None]) -> None:
        """Call ``callback(key, value)`` from the agent thread on every change;
        ``value`` is None for a deleted key. Keep it cheap."""
        self._callbacks = [*self._callbacks, callback]  # copy: the agent iterates it

    def remove_on_change(self, callback: Callable[[str, Any], None]) -> None:
        self._callbacks = [c for c in self._callbacks if c is not callback]

    @property
    def sequence(self) -> int:
        """The server sequence number of the last update applied."""
        return self._seq

    # -- state changes (agent thread) ------------------------------------------

    @property
    def healthy(self) -> bool:
        """In step with a server we heard from lately: what we hold is the store as it is now.
        (During an outage the copy is kept as it was; a key missing from it then proves nothing.)"""
        agent = self._agent
        return (agent is not None and agent.phase == "live"
                and time.monotonic() - agent.last_heard <= agent.heartbeat_timeout)

    @property
    def silence(self) -> float:
        """Seconds since we last heard from the server (0 while in step with it)."""
        agent = self._agent
        if agent is None:
            return 0.0
        quiet = time.monotonic() - (agent.last_heard or self.started_at)
        return 0.0 if self.healthy else quiet

    def _install(self, state: dict[str, Any], seq: int) -> None:
        self.synced_at = time.monotonic()
        with self._cond:
            old, self._state, self._seq = self._state, state, seq
            self._version += 1
            self._cond.notify_all()
        for key, value in state.items():
            if old.get(key, _MISSING) != value:
                self._notify(key, value)
        for key in old.keys() - state.keys():
            self._notify(key, None)

    def _apply(self, key: str, value: Any, deleted: bool, seq: int) -> None:
        with self._cond:
            self._seq = seq
            if deleted:
                changed = self._state.pop(key, _MISSING) is not _MISSING
            else:
                changed = self._state.get(key, _MISSING) != value
                self._state[key] = value
            if changed:
                self._version += 1
                self._cond.notify_all()
        if changed:
            self._notify(key, None if deleted else value)

    def _notify(self, key: str, value: Any) -> None:
        for callback in self._callbacks:
            try:
                callback(key, value)
            except Exception:
                log.exception("KV on_change callback failed for %r", key)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a key must be a non-empty str, got {key!r}")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it
        raise ValueError(f"a key must be valid UTF-8 text, got {key!r}") from None
    if size > p.MAX_KEY:
        raise ValueError(f"key over {p.MAX_KEY} bytes: {key[:40]!r}...")
