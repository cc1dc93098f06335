"""The node group's receiving thread: every message checked, every part filed into its item, every scan counted.

One thread serves every receiving socket (zpipe.transport.inbox). A message is acted on only
after the scan protocol's checks (zpipe.scans.messages): the pipeline's id, a sender wired to
that socket (zpipe.topology.plan), an `info` from that sender before its data, one `done` and one
`end` each, a part that fits its item (zpipe.assemble). Anything else is rejected with a reason,
counted (for the scan, when it names one of ours) and never stalls the loop. A data part goes
straight into its item, held by reference (zero-copy), in the lane of the worker that owns the
item's key; flow control (`must_wait`) parks a socket whose part runs too far ahead, or while
the worker is behind, so memory is bounded by settings, never by the scan.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from zpipe.assemble import Assembler
from zpipe.scans import messages
from zpipe.scans.messages import Rejected, Rejects, sender_of
from zpipe.transport.inbox import Inbox

log = logging.getLogger("zpipe.nodegroup")
READY_MAX = 64  # complete items waiting for a worker, per worker
# Items a worker's lane may hold waiting for their other parts (see must_wait): a part that
# would start an item further ahead parks its socket (whose HWM then pushes back on the sector
# that runs ahead) until the slower sectors catch up. Should nothing complete for FLOW_STALL
# seconds while it waits, or after FLOW_TIMEOUT, it goes on: a safety net, counted in the status.
IN_FLIGHT = 192
FLOW_TIMEOUT = 5.0
FLOW_STALL = 0.05
PARK_POLL_MS = 2  # how often parked parts are looked at again
WORKER_STUCK = 600.0  # s a part waits for a worker that takes nothing before parts are turned away


@dataclass
class Sender:
    """One upstream sender's share of one scan, as this node group saw it."""

    info: bool = False
    expected: int | None = None  # what its info announced (producers say; aggregator channels do not)
    done: int | None = None  # what its done says it sent us
    accepted: int = 0
    rejected: int = 0
    abandoned: bool = False  # it gave up on us mid-scan (we looked gone) and sent the rest elsewhere
    parts: set = field(default_factory=set)  # part numbers it carried (a sector's sender carries one)


@dataclass
class ScanState:
    id: int
    node_groups: list[int]
    meta: dict
    senders: dict = field(default_factory=dict)  # immediate sender -> Sender
    received: int = 0  # accepted parts; written by the receiving thread only
    bytes: int = 0
    rejected: dict = field(default_factory=dict)  # reason -> count, for messages of this scan
    last: float = field(default_factory=time.monotonic)
    first_received: float | None = None  # wall clock, for the report's streaming time
    held: int = 0  # parts parked by flow control
    overrides: int = 0  # parked parts let go by the safety net, not by the rule
    max_pending: int = 0  # most items that waited for parts at once, in one lane
    closed: bool = False  # set by the closing side: no part is filed any more
    over: set = field(default_factory=set)  # part numbers that will not come (their senders are gone)

    @property
    def keys(self) -> tuple[int, int] | None:
        k = self.meta.get("keys")
        return tuple(k) if k else None

    def reject(self, reason: str, sender: Sender | None = None) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if sender is not None:
            sender.rejected += 1


@dataclass(slots=True)
class Part:
    """A received data part on its way into an item; it waits here while flow control holds its socket."""

    frames: list
    header: dict
    st: ScanState
    sender: Sender
    origin: str
    lane: "Lane"
    key: int
    since: float = 0.0  # parked at
    still: float = 0.0  # last time an item completed while parked
    progress: int = 0


class Lane:
    """One worker's share of the items: its assemblers (by scan), guarded by one condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.assemblers: dict[int, Assembler] = {}
        self.closed: set[int] = set()  # scans flushed: a late part is rejected, not assembled
        self.flushes: list[int] = []  # scans the worker is to close
        self.completed = 0  # items completed so far: flow control's sign of progress
        self.ready = 0  # items ready for the worker (complete, or as complete as they will be), not yet taken
        self.stuck = False  # the worker has taken nothing for WORKER_STUCK seconds


class Receiver:
    """The receiving side of one node group; its scans are read by the closing side under `lock`."""

    def __init__(self, group):
        self.group = group
        self.rt, self.spec, self.plan = group.rt, group.rt.spec, group.rt.plan
        self.pipe, self.me = self.rt.pipe, self.rt.replica
        self.meter = self.rt.meter
        self.rejects = Rejects(f"{self.rt.label}.{self.plan.node_group_in}", self.meter)
        self.lanes: list[Lane] = group.lanes
        self.lock = threading.Lock()
        self.scans: dict[int, ScanState] = {}
        self.closed: dict[int, dict[str, int]] = {}  # closed scan -> late messages by reason
        self.ended: set[str] = set()  # immediate senders that said `end`, corroborated by their end record
        self.claimed_end: set[str] = set()  # said `end`, not yet corroborated (an `end` alone may be forged)
        self.gone: dict[str, str] = {}  # immediate senders found gone -> why
        self.ended_as: dict[str, float | None] = {}  # ended sender -> the incarnation (zpipe.roster) that ended
        self.into: list[frozenset] = [frozenset(self.plan.senders_into(t)) for t in range(self.spec.threads)]
        self.finished = threading.Event()  # every sender ended or is gone
        self.messages = 0
        self.carries: dict[str, set[int]] = {}  # immediate sender -> part numbers it has carried, any scan

    # -- the loop ------------------------------------------------------------------------------------
    def serve(self) -> None:
        socks = [self.rt.bind_per_thread(self.plan.node_group_in, t) for t in range(self.spec.threads)]
        try:
            Inbox(socks).serve(self.take, self.retry, lambda: not (self.finished.is_set() or self.rt.stop.is_set() or self.group.stopping),
                               park_poll_ms=PARK_POLL_MS, tick=self.tick)
        finally:
            for sock in socks:
                sock.close(linger=0)

    def tick(self, now: float) -> None:
        """Notice upstream senders that are gone: they will send nothing more. The parts they carried
        will not come: items that lack only those go to the workers now (zpipe.assemble.over)."""
        newly = []
        roster = self.rt.roster
        for s, (node, replica) in self.plan.sender_nodes.items():
            if s not in self.ended and s not in self.gone:
                why = roster.departed(node, replica, self.pipe)
                if why:
                    self.gone[s] = why
                    newly.append(s)
            elif s in self.gone and roster.alive(node, replica):
                del self.gone[s]  # back (it froze, or was restarted): its next scans are waited for again
                log.info("%s: sender %s is back", self.rt.label, s)
            elif s in self.ended and roster.incarnation(node, replica) not in (None, self.ended_as.get(s)):
                self.ended.discard(s)  # a new process in its place (a service restarted): it sends again
                log.info("%s: sender %s is back (restarted)", self.rt.label, s)
        for s in list(self.claimed_end):
            node, replica = self.plan.sender_nodes[s]
            if roster.ended(node, replica, self.pipe):  # its own record corroborates its `end`
                self.claimed_end.discard(s)
                self.ended.add(s)
                self.ended_as[s] = roster.incarnation(node, replica)
                newly.append(s)
        if newly:
            self.parts_over()
        # In a pipeline of services, senders that are gone may come back: only their clean ends end us.
        if all(s in self.ended or (s in self.gone and not self.plan.service) for s in self.plan.ng_senders):
            self.finished.set()

    def over_for(self, st: "ScanState") -> set[int]:
        """The part numbers that will not come for scan `st`: those only senders carried (in any scan)
        that are gone or ended without their `done` for it. Under self.lock."""
        live, dead = set(), set()
        for s in self.plan.ng_senders:
            snd = st.senders.get(s)
            over = (snd is None or snd.done is None) and (s in self.gone or s in self.ended)
            (dead if over else live).update(self.carries.get(s, ()))
        return dead - live

    def parts_over(self) -> None:
        """Senders went: in every open scan, items that lack only their parts go to the workers now."""
        with self.lock:
            scans = list(self.scans.values())
            for st in scans:
                st.over = self.over_for(st)
        for st in scans:
            if not st.over:
                continue
            for lane in self.lanes:
                with lane.cond:
                    asm = lane.assemblers.get(st.id)
                    if asm is not None and (went := asm.over(st.over)):
                        lane.ready += went
                        lane.cond.notify_all()

    # -- one message -----------------------------------------------------------------------------------
    def take(self, t: int, frames) -> Part | None:
        """Act on one message from socket t; a data part that must wait comes back (its socket parks)."""
        header = None
        try:
            header = messages.ours(frames[0], self.pipe)
            kind = header.get("type")
            if kind is None or kind == "data":
                return self.data(t, header, frames)
            sender = header.get("sender")
            if not isinstance(sender, str) or sender not in self.into[t]:
                raise Rejected("unknown sender", f"socket {t} hears only {sorted(self.into[t])}")
            if kind != "end" and sender in self.claimed_end:  # it speaks after its `end`: not its own
                self.claimed_end.discard(sender)
                self.rejects.add("end contradicted by later messages", sender)
            if kind == "info":
                self.info(header, frames, sender)
            elif kind == "done":
                self.done(header, sender)
            elif kind == "end":
                self.end(sender)
            else:
                raise Rejected("unknown message type", messages.brief(kind))
        except Rejected as exc:
            self.rejects.reject(exc, sender_of(header or exc.header))
            self._attribute(header, exc.reason)
        except Exception as exc:  # a shape no check foresaw: still rejected and counted, never a crash
            self.rejects.add("malformed message", sender_of(header), exc.__class__.__name__)
        return None

    def _attribute(self, header, reason: str) -> None:
        """A rejected message that names one of our scans counts in that scan's account too."""
        if not isinstance(header, dict) or header.get("pipe") != self.pipe or type(header.get("scan")) is not int:
            return
        scan, claimed = header["scan"], header.get("sender")
        imm = (self.plan.via.get(claimed) or claimed) if isinstance(claimed, str) else None
        if imm not in self.plan.ng_senders:
            return  # not one of the scan's senders: the node's count, not the scan's
        with self.lock:
            st = self.scans.get(scan)
            if st is not None:
                st.reject(reason, st.senders.get(imm))
            elif scan in self.closed:
                late = self.closed[scan]
                late[reason] = late.get(reason, 0) + 1

    def data(self, t: int, header: dict, frames) -> Part | None:
        origin = header.get("sender")
        imm = self.plan.via.get(origin) if isinstance(origin, str) else None
        if imm is None:
            raise Rejected("unknown sender")
        if imm not in self.into[t]:
            raise Rejected("sender on the wrong socket", f"{imm} does not feed socket {t}")
        scan = header.get("scan")
        st = self.scans.get(scan) if type(scan) is int else None
        if st is None:
            if type(scan) is not int:
                raise Rejected("bad scan number", messages.brief(scan))
            raise Rejected("part after the scan closed" if scan in self.closed else "data for an unknown scan",
                           f"scan {scan}")
        snd = st.senders.get(imm)
        if snd is None or not snd.info or snd.done is not None:
            raise Rejected("data out of turn", f"scan {scan}: no info from {imm} yet, or after its done")
        if len(frames) != 2:
            raise Rejected("wrong number of frames", f"data has 2, got {len(frames)}")
        k = header.get(self.spec.assemble.key)
        if type(k) is not int:
            raise Rejected("part without its key", f"no integer {self.spec.assemble.key!r}")
        number = header.get(self.spec.assemble.part)
        if type(number) is int and number not in snd.parts and len(snd.parts) < 64:
            snd.parts.add(number)
            self.carries.setdefault(imm, set()).add(number)
        if st.first_received is None:
            st.first_received = time.time()
        st.last = time.monotonic()
        w = (k // len(st.node_groups)) % len(self.lanes)  # keys come to us 1 in node_groups
        part = Part(frames, header, st, snd, origin, self.lanes[w], k)
        if part.lane.stuck and part.lane.ready >= READY_MAX:
            self._turn_away(part, "worker stuck")
            return None
        if self.must_wait(part):
            st.held += 1
            part.since = part.still = time.monotonic()
            part.progress = part.lane.completed
            return part
        self.place(part)
        return None

    def info(self, header: dict, frames, sender: str) -> None:
        if len(frames) != 1:
            raise Rejected("wrong number of frames", f"an info has 1, got {len(frames)}")
        scan = messages.scan_id(header)
        ngs = messages.node_groups(header.get("node_groups"))
        meta = messages.meta(header.get("meta"))
        expected = header.get("expected")
        if expected is not None:
            expected = messages.count(expected, "expected count")
        if self.me not in ngs:
            raise Rejected("info for a scan of other node groups", f"scan {scan} is for {ngs}")
        with self.lock:
            if scan in self.closed or scan in self.group.finals:
                raise Rejected("info for a closed scan", f"scan {scan}")
            st = self.scans.get(scan)
            if st is None:
                st = self.scans[scan] = ScanState(scan, list(ngs), meta)
                st.over = self.over_for(st)  # senders already gone or ended carry nothing of it
                self.group.opened(st)
            elif ngs != st.node_groups or meta.get("keys") != st.meta.get("keys"):
                raise Rejected("info disagrees with the scan's", f"scan {scan}")
            snd = st.senders.setdefault(sender, Sender())
            if snd.info:
                raise Rejected("second info", f"scan {scan}")
            snd.info, snd.expected = True, expected
            st.last = time.monotonic()

    def done(self, header: dict, sender: str) -> None:
        scan = messages.scan_id(header)
        sent = messages.count(header.get("sent"), "sent count")
        with self.lock:
            st = self.scans.get(scan)
            snd = st.senders.get(sender) if st else None
            if snd is None or not snd.info:
                raise Rejected("done out of turn", f"scan {scan}: no info from this sender")
            if snd.done is not None:
                raise Rejected("second done", f"scan {scan}")
            if sent < snd.accepted:
                raise Rejected("done counts fewer than arrived", f"scan {scan}: says {sent}, {snd.accepted} arrived")
            snd.done = sent
            snd.abandoned = header.get("abandoned") is True
            st.last = time.monotonic()

    def end(self, sender: str) -> None:
        if sender in self.ended or sender in self.claimed_end:
            raise Rejected("second end")
        with self.lock:
            still = [st.id for st in self.scans.values()
                     if (snd := st.senders.get(sender)) is not None and snd.info and snd.done is None]
        if still:
            raise Rejected("end before done", f"scans {still} still open for this sender")
        self.claimed_end.add(sender)  # believed at the next tick, once its own end record is there

    # -- filing parts --------------------------------------------------------------------------------
    def place(self, p: Part) -> None:
        """Put one part into its item (by reference), in the lane of the worker that owns the item's key."""
        lane, st = p.lane, p.st
        nbytes = len(p.frames[1])
        try:
            with lane.cond:  # the closing side reads the counts after the lanes' flush, under this lock
                asm = lane.assemblers.get(st.id)
                if asm is None:
                    if st.closed or st.id in lane.closed:
                        raise Rejected("part after the scan closed", f"scan {st.id}")
                    asm = lane.assemblers[st.id] = Assembler(self.spec.assemble, self.spec.batch, key_range=st.keys)
                    if st.over:
                        asm.over(st.over)
                elif st.closed:
                    raise Rejected("part after the scan closed", f"scan {st.id}")
                if asm.add(p.header, p.frames[1].buffer):
                    lane.completed += 1
                    lane.ready += 1
                    if len(asm.ready) + len(asm.incomplete) >= self.spec.batch:
                        lane.cond.notify_all()
                elif len(asm.pending) > st.max_pending:
                    st.max_pending = len(asm.pending)
                p.sender.accepted += 1
                st.received += 1  # counted once placed: when the counts add up, every part is in
                st.bytes += nbytes
        except Rejected as exc:
            self.rejects.reject(exc, p.origin)
            with self.lock:
                if st.closed and st.id in self.closed:  # its part is made: count it where it still shows
                    late = self.closed[st.id]
                    late[exc.reason] = late.get(exc.reason, 0) + 1
                else:
                    st.reject(exc.reason, p.sender)
            return
        self.messages += 1
        self.meter.msgs_in += 1
        self.meter.bytes_in += nbytes

    def _turn_away(self, p: Part, reason: str) -> None:
        self.rejects.add(reason, p.origin)
        with self.lock:
            p.st.reject(reason, p.sender)

    def must_wait(self, p: Part) -> bool:
        """Flow control: wait while the worker is behind, or while this part's item is too far ahead.

        "Too far" is measured in keys (frame numbers), which order every stream the same way:
        a part may start a new item only within `window` keys of the oldest item still waiting
        for parts. Every node group holds by the same rule, so a sector held here can never wait,
        through a shared upstream thread, on a sector held by another node group: the one held
        is always the furthest ahead. Items whose missing parts' streams moved `window` beyond
        them are stale (lost upstream, most likely) and do not hold the window back.
        """
        lane = p.lane
        if lane.ready >= READY_MAX:
            return True  # the worker is behind: wait for it (it always moves on: see workers)
        if self.rt.leave.is_set():
            # Leaving: nothing new is routed here, so what still comes is what the queues upstream
            # held (bounded by their HWMs). Its sectors stop at different points (each producer
            # thread turns to disk on its own), so items no longer complete in step: holding parts
            # for them would only slow the drain to the safety net's pace.
            return False
        asm = lane.assemblers.get(p.st.id)
        if asm is None or p.key in asm.pending or p.key in asm.stale or len(asm.pending) < IN_FLIGHT // 2:
            return False  # a new scan, a part an item waits for, or plenty of room
        window = IN_FLIGHT * len(p.st.node_groups) * len(self.lanes)  # keys in a lane are this far apart
        with lane.cond:
            frontier = asm.frontier(window)
        return frontier is not None and p.key >= frontier + window

    def retry(self, p: Part, now: float) -> bool:
        """Place a parked part if it may go now; True once it went."""
        lane = p.lane
        if not self.must_wait(p) or self.rt.stop.is_set():
            self.meter.blocked_s += now - p.since
            lane.stuck = False
            self.place(p)
            return True
        if lane.ready >= READY_MAX and now - p.since > WORKER_STUCK:
            # The worker has taken nothing for WORKER_STUCK seconds: an analysis hook that never
            # returns. Its parts are turned away (counted) from now on; the scan closes by its counts.
            if not lane.stuck:
                lane.stuck = True
                log.error("%s: a worker has taken no item for %.0f s (an analysis stuck in a hook?); its "
                          "parts are turned away until it moves", self.rt.label, WORKER_STUCK)
            self.meter.blocked_s += now - p.since
            self._turn_away(p, "worker stuck")
            return True
        if lane.ready < READY_MAX:  # held for the items in flight, not for the worker
            if lane.completed != p.progress:
                p.progress, p.still = lane.completed, now
            elif now - p.still >= FLOW_STALL or now - p.since >= FLOW_TIMEOUT:
                # Nothing completes while it waits: what the items need is queued behind a parked
                # part (one socket carries several senders). Go on rather than deadlock.
                self.meter.flow_overrides += 1
                p.st.overrides += 1
                self.meter.blocked_s += now - p.since
                self.place(p)
                return True
        p.st.last = now  # held back, not quiet
        return False

    # -- the scan's end, as the receiving side sees it ------------------------------------------------
    def state_of(self, st: ScanState) -> tuple[bool, dict[str, str]]:
        """(every sender is through with the scan, senders that left it without their done and why)."""
        left: dict[str, str] = {}
        for s in self.plan.ng_senders:
            snd = st.senders.get(s)
            if snd is not None and snd.done is not None:
                continue
            if s in self.gone:
                left[s] = f"is gone ({self.gone[s]}) without its done"
            elif s in self.ended:
                left[s] = "ended without taking part" if snd is None else "ended without its done"
            else:
                return False, left
        return True, left

    def close(self, st: ScanState) -> None:
        """No part of the scan is taken any more: later ones are counted as late."""
        st.closed = True
        with self.lock:
            self.scans.pop(st.id, None)
            self.closed[st.id] = {}
            while len(self.closed) > 100_000:  # the oldest closed scans are forgotten; their late parts are 'unknown'
                self.closed.pop(next(iter(self.closed)))
