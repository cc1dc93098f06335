"""Several pull sockets served from one thread, each drained in turn; one whose message must wait is parked alone.

The aggregator (one socket per producer replica) and the node group (one per aggregator
channel) both receive this way. A parked socket is not read, so its HWM pushes back on
the one sender behind it while the other sockets go on: the back-pressure of a blocking
thread per socket, without threads taking turns at the GIL on every message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

DRAIN = 256  # messages taken from one socket per pass before looking at the others
# After a pass that found fewer than COALESCE messages, sleep COALESCE_S before polling again:
# at most that much latency, for far fewer wake-ups per message on a loaded machine.
COALESCE = 8
COALESCE_S = 0.001
TICK_S = 0.05
MAX_FRAMES = 8  # parts of one message kept; a protocol message has at most 2


class Inbox:
    def __init__(self, socks: list[zmq.Socket]):
        self.socks = socks
        self.index = {s: i for i, s in enumerate(socks)}

    def serve(self, take: Callable, retry: Callable, running: Callable[[], bool], *,
              park_poll_ms: int, tick: Callable[[float], None] | None = None) -> None:
        """Receive until `running()` is false.

        `take(i, frames)` handles a whole message from socket i and returns None, or a token
        to park socket i with; `retry(token, now)` is asked every `park_poll_ms` whether the
        parked message went on (True unparks the socket). `tick(now)` runs every TICK_S seconds
        whatever the traffic: the owner's look at its peers and its scans, never skipped by a flood.
        """
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        parked: dict[int, object] = {}
        n, drained = len(self.socks), 0
        next_tick = 0.0
        while running():
            if len(parked) == n or 0 < drained < COALESCE:
                time.sleep(COALESCE_S)  # all parked (polling nothing would not wait), or a trickle
            drained = 0
            events = poller.poll(park_poll_ms if parked else 100) if len(parked) < n else []
            if tick is not None and (now := time.monotonic()) >= next_tick:
                next_tick = now + TICK_S
                tick(now)
            for sock, _ in events:
                i, recv = self.index[sock], sock.recv
                for _ in range(DRAIN):
                    try:
                        head = recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    frames = [head]
                    while frames[-1].more:  # set from the message itself: no getsockopt per part
                        part = recv(copy=False)
                        if len(frames) < MAX_FRAMES:
                            frames.append(part)
                        elif not part.more:
                            break  # a message of absurdly many parts: the first MAX_FRAMES say it is bad
                    drained += 1
                    token = take(i, frames)
                    if token is not None:
                        parked[i] = token
                        poller.unregister(sock)
                        break
            if parked:
                now = time.monotonic()
                for i in [i for i, token in parked.items() if retry(token, now)]:
                    del parked[i]
                    poller.register(self.socks[i], zmq.POLLIN)
