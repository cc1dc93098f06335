"""One producer thread's share of one scan: info, data, done, on its own connection(s).

The share goes to the scan's node groups (straight, `route` set, or through the aggregator).
Should they leave (their session ends), die or freeze mid-scan, the rest goes to those still
there; should none be left, or the aggregator be gone, the rest goes to disk (`fallback`) when
the source can record it, else it is counted undeliverable. Either way the thread's figures
say exactly what went where: sent, written, undeliverable.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

from zpipe.plugin import Scan, Source
from zpipe.runtime import NodeRuntime
from zpipe.scans import messages
from zpipe.scans.account import KeySet
from zpipe.transport.outbox import Outbox, PeerGone
from zpipe.wire import pack_header

log = logging.getLogger("zpipe.producer")
LOOK_EVERY = 0.05  # s between looks at the roster while sending (a node group leaving, an aggregator gone)


@dataclass
class Job:
    """One scan as a producer sends it: its id in the pipeline, and what its plugins are given.

    `scan.id` differs from `id` only for a replay (the files' own scan number)."""

    id: int
    scan: Scan
    plugins: list[Source]
    request: dict | None = None  # the acquisition's request (service mode)
    replay: bool = False  # the data comes from disk: never written to disk again

    @property
    def meta(self) -> dict:
        return self.scan.meta


class Pace:
    """Keeps a replica's sending threads within DRIFT messages of each other.

    The threads' streams meet on one socket downstream, so their sum is what a node group
    sees of this sector; kept in step, that stream stays in frame order within a small
    slack, which the node groups' flow control relies on (see nodegroup.must_wait), as a
    detector's own readout does. A thread that has sent everything stops counting.
    """

    DRIFT = 96  # node groups hold a sector back 192 frames per worker ahead: well above this
    CHECK = 8  # messages between looks

    def __init__(self, threads: int):
        self.sent = [0] * threads

    def step(self, t: int, n: int, stop) -> None:
        self.sent[t] = n
        if n - min(self.sent) <= self.DRIFT:
            return
        while n - min(self.sent) > self.DRIFT // 2:  # let the others catch up well, not just back to the line
            if stop.is_set():
                raise InterruptedError("stopped while sending")
            time.sleep(0.001)

    def done(self, t: int) -> None:
        self.sent[t] = float("inf")


@dataclass
class Spill:
    """The rest of a thread's share, written to disk once nobody downstream can take it."""

    plugin: Source
    scan: Scan
    directory: str
    key: str | None  # header field naming the item (the node groups' assemble key)
    part: str | None  # header field numbering the part
    keys: tuple[int, int] | None  # the scan's key range, for the written keys' bitmap
    recorder: object = None
    written: int = 0
    bytes: int = 0
    items: dict = field(default_factory=dict)  # part number -> KeySet of the items whose part was written

    def write(self, msg) -> None:
        if self.recorder is None:
            import os

            os.makedirs(self.directory, exist_ok=True)
            self.recorder = self.plugin.recorder(self.scan, self.directory)
        self.recorder.write(msg)
        self.written += 1
        self.bytes += msg.nbytes
        k = msg.header.get(self.key) if self.key else None
        p = msg.header.get(self.part, 0) if self.part else 0
        if type(k) is int and type(p) is int:
            ks = self.items.get(p)
            if ks is None:
                ks = self.items[p] = KeySet(self.keys)
            ks.add(k)

    def close(self) -> dict | None:
        """The files made final; their manifest (None if nothing was written)."""
        return self.recorder.close() if self.recorder is not None else None

    def abort(self) -> None:
        abort = getattr(self.recorder, "abort", None)
        if abort:
            abort()

    def packed(self) -> dict[str, dict]:
        return {str(p): ks.pack() for p, ks in self.items.items()}


def stream(rt: NodeRuntime, plugin: Source, job: Job, t: int, ngs: list[int], out: Outbox, pace: Pace,
           owed: dict[int, list], spill: Spill | None, share: tuple[int, collections.Counter]) -> dict:
    """Thread t's share of the scan. `owed`: node group -> `done`s of earlier scans this thread gave up
    on it in, sent first should it come back (it was frozen, not dead). `spill`: where the rest goes
    when nobody downstream can take it (None: nowhere, it is counted undeliverable). `share`: its plan
    (messages, and per node group when sending straight to them: producer._plan_share)."""
    plan, pipe, sc = rt.plan, rt.pipe, job.scan
    route, threads = plan.route, rt.spec.threads
    direct = plan.aggregator is None
    me = plan.producer_sender(rt.replica, t)
    n = len(ngs)
    gone: set[int] = set()  # node groups of the scan we send nothing more to (gone, or leaving)
    planned, counts = share
    messages_sent = nbytes = lost = 0
    sent_to: collections.Counter = collections.Counter()
    first_sent = None
    downstream = True  # False once nothing downstream can take the rest of our share
    aggregator_gone = False
    told: set[int] = set()  # node groups (direct) or the aggregator (0) our info reached
    handed: set[int] = set()  # ... that have our `done` for the scan already

    def deliver(g: int, frames) -> bool:
        """Send to node group g (direct) or the aggregator; False if it is gone (noted)."""
        nonlocal aggregator_gone
        try:
            out.send(g if direct else 0, frames)
            return True
        except PeerGone as exc:
            if direct:
                if g not in gone:
                    gone.add(g)
                    log.warning("scan %d: %s; the rest of its share goes to the scan's other node groups", job.id, exc)
            else:
                aggregator_gone = True
                off(str(exc))
            return False

    def hand_back(g: int) -> None:
        """Our `done` to node group g (direct) or the aggregator: we send it nothing more of the scan."""
        if g in handed:
            return
        done = messages.done(pipe, job.id, me, sent_to.get(g, 0) if direct else messages_sent,
                             abandoned=direct and g in gone)
        if (direct and g in gone) or aggregator_gone:
            if direct and g in told:  # should it come back (it froze), it learns we gave up on it
                owed.setdefault(g, []).append(done)
        elif deliver(g, done):
            handed.add(g)
        elif direct and g in told:
            owed.setdefault(g, []).append(done)

    def off(why: str) -> None:
        """Nothing downstream can take the rest: whoever is still there gets our done now (a leaving
        node group closes its scan and goes), and the rest goes to disk, or is counted undeliverable."""
        nonlocal downstream
        if not downstream:
            return
        downstream = False
        if spill is not None:
            log.warning("scan %d: %s; the rest of this thread's share goes to disk (%s)", job.id, why, spill.directory)
        else:
            log.warning("scan %d: %s; the rest of this thread's share is undeliverable (no `fallback` to write it to)",
                        job.id, why)
        for g in (ngs if direct else ([] if aggregator_gone else [0])):
            hand_back(g)

    def look() -> None:
        """A node group of the scan that began to leave gets nothing more, and our done at once, while
        others remain; once none is left to take the rest, it goes to disk."""
        roster, node = rt.roster, plan.node_group
        if not direct and roster.leaving(plan.aggregator, 0):
            # It relays what it has to its end and goes (zpipe.roles.aggregator, bounded): the rest, to disk.
            off(f"the aggregator {plan.aggregator} is leaving")
            return
        leaving = [g for g in ngs if g not in gone and roster.leaving(node, g)]
        if all(g in gone or g in leaving or roster.gone(node, g) for g in ngs):
            off("every node group of the scan left or is gone")
            return
        if direct:
            for g in leaving:
                gone.add(g)
                log.info("scan %d: %s[%d] is leaving; the rest of its share goes to the scan's other node groups",
                         job.id, node, g)
                if deliver(g, messages.done(pipe, job.id, me, sent_to.get(g, 0), abandoned=True)):
                    handed.add(g)

    def aside(msg) -> None:
        nonlocal lost
        if spill is not None:
            spill.write(msg)
        else:
            lost += 1

    for g in (ngs if direct else [0]):
        for done in owed.pop(g, ()) if direct else ():
            deliver(g, done)
        if deliver(g, messages.info(pipe, job.id, me, ngs, job.meta, expected=counts.get(g, 0) if direct else planned)):
            told.add(g)
    look()  # the peers chosen for the scan may have begun to leave while the plan was made
    looked = time.monotonic()
    stop = rt.stop
    for msg in plugin.messages(sc, t, threads):
        if stop.is_set():
            raise InterruptedError("stopped while sending")
        header = msg.header
        header["scan"], header["pipe"], header["sender"] = job.id, pipe, me
        if downstream:
            now = time.monotonic()
            if now - looked > LOOK_EVERY:
                looked = now
                look()
        if not downstream:
            if rt.stop.is_set():
                raise InterruptedError("stopped")
            aside(msg)
            continue
        frames = [pack_header(header), msg.payload]
        if direct:
            key = int(header[route])
            g = ngs[key % n]
            while g in gone or not deliver(g, frames):
                alive = [x for x in ngs if x not in gone]
                if not alive:
                    g = None
                    break
                g = alive[key % len(alive)]
            if g is None:  # the last of them was found gone by this very send
                off("every node group of the scan is gone")
                aside(msg)
                continue
            sent_to[g] += 1
        elif not deliver(0, frames):
            aside(msg)
            continue
        if first_sent is None:
            first_sent = time.time()
        messages_sent += 1
        if messages_sent % pace.CHECK == 0 and len(pace.sent) > 1:
            pace.step(t, messages_sent, rt.stop)
        nbytes += msg.nbytes
        rt.meter.msgs_out += 1
        rt.meter.bytes_out += msg.nbytes
    pace.done(t)
    for g in (ngs if direct else [0]):
        hand_back(g)
    return {"planned": planned, "messages": messages_sent, "bytes": nbytes, "undeliverable": lost,
            "first_sent": first_sent, "last_sent": time.time() if first_sent is not None else None,
            "sent_to": {str(g): n for g, n in sent_to.items()}}


def send_end(rt: NodeRuntime, t: int, out: Outbox, direct: bool, owed: dict[int, list]) -> None:
    """This thread has no more scans: say so to every live replica it sends to (after what it owes them)."""
    end = messages.end(rt.pipe, rt.plan.producer_sender(rt.replica, t))
    out.refresh()
    for g in (out.replicas() if direct else [0]):
        try:
            for done in owed.pop(g, ()):
                out.send(g, done)
            out.send(g, end)
        except PeerGone:
            pass
