"""The aggregator role: one channel per producer replica, relaying each message to the node group its `route` field picks.

Each channel (`threads` of them, 1:1 with producer replicas: a pull socket in and a push per
node group out) checks every message against the scan protocol (zpipe.scans.messages) before
acting on it: the pipeline's id, a sender among its producer's threads, an `info` before the
sender's data, one `done` and one `end` each. At a scan's first `info` it tells every node group
of the scan (its own `info`), relays the data (zero-copy, never re-encoded), and once every
producer thread has said `done` (or is gone) tells each node group how many it relayed to it.
A node group that dies or freezes mid-scan is noticed (zpipe.roster): the rest of its share goes
to the scan's node groups still alive, so the scan ends on them. One that is leaving (its session
ends) gets nothing new and, at once, our `done` with what it was sent, while others remain; when
all of them are leaving, they still get the scan until its producers turn to disk. One thread serves every
channel (zpipe.transport.inbox); a channel whose node group has no room is held while the
others go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from zpipe import flow
from zpipe.scans import messages
from zpipe.scans.messages import Rejected, Rejects, sender_of
from zpipe.transport.inbox import Inbox
from zpipe.transport.outbox import Outbox, PeerGone
from zpipe.runtime import NodeRuntime

log = logging.getLogger("zpipe.aggregator")
HELD_POLL_MS = 1  # how often held channels try again
LEAVE_WAIT = 20.0  # s a leaving aggregator relays the scans under way, at most
LEAVE_SETTLE = 1.0  # s with no scan open before a leaving aggregator goes


def run(rt: NodeRuntime, _make_plugin) -> dict:
    plan = rt.plan
    rejects = Rejects(rt.label, rt.meter)
    channels: list[_Channel] = []
    ok = False
    try:
        for c in range(rt.spec.threads):
            out = Outbox(rt, plan.aggregator_out, plan.node_group, f"{plan.node_group_in}@{plan.ng_socket_of_replica(c)}")
            channels.append(_Channel(c, rt.bind_per_thread(plan.aggregator_in, c), out, plan.channel_origins(c),
                                     plan.channel_sender(c)))
        relay = _Relay(rt, channels, rejects)
        relay.run()
        ok = True
    finally:
        for ch in channels:
            ch.out.close(linger_ms=30_000 if ok else 0)
            ch.pull.close(linger=0)
    out = {k: sum(ch.totals[k] for ch in channels) for k in ("messages", "bytes", "undeliverable", "rerouted")}
    out["rejected"] = rejects.count
    if not rt.leave.is_set():  # ended with its producers (left early, it may come back: no `end`)
        flow.publish(rt.kv, rt.name, rt.replica, "end", done=True, pipe=rt.pipe, **out)
    return out


@dataclass
class _Scan:
    """One scan as one channel sees it."""

    id: int
    node_groups: list[int]
    meta: dict
    infos: set = field(default_factory=set)  # producer threads that announced the scan
    dones: dict = field(default_factory=dict)  # producer thread -> messages it says it sent
    received: int = 0
    forwarded: dict = field(default_factory=dict)  # node group -> data messages relayed to it
    gone: set = field(default_factory=set)  # node groups found gone during the scan
    left: set = field(default_factory=set)  # node groups leaving: handed their `done` early, sent nothing more
    told: set = field(default_factory=set)  # node groups our info reached
    undeliverable: int = 0
    rerouted: int = 0
    closed: bool = False


@dataclass
class _Channel:
    """One producer replica's stream: its own pull socket in, its own push per node group out."""

    c: int
    pull: zmq.Socket
    out: Outbox
    origins: frozenset  # the producer threads that may send on this channel
    me: str  # our sender id toward the node groups
    scans: dict = field(default_factory=dict)  # scan -> _Scan
    closed: set = field(default_factory=set)  # scans closed on this channel
    ended: set = field(default_factory=set)  # producer threads that sent `end`
    gone: set = field(default_factory=set)  # producer threads found gone
    finished: bool = False
    latest: int = -1  # the latest scan this channel has heard of
    queue: deque = field(default_factory=deque)  # (node group or None, frames, scan state, key) waiting to go
    owed: dict = field(default_factory=dict)  # node group -> `done`s of scans we gave up on it in, for if it returns
    since: float = 0.0
    totals: dict = field(default_factory=lambda: {"messages": 0, "bytes": 0, "undeliverable": 0, "rerouted": 0})


class _Relay:
    """One thread relays every channel: pull, check, decode the header, push to the node group it picks."""

    def __init__(self, rt: NodeRuntime, channels: list[_Channel], rejects: Rejects):
        self.rt, self.channels, self.rejects = rt, channels, rejects
        self.route, self.pipe = rt.plan.route, rt.pipe
        self.open = len(channels)  # channels whose producers have not all ended (or gone)
        self.scan_channels: dict[int, set[int]] = {}  # scan -> channels that closed it (for our flow record)
        self.scan_totals: dict[int, dict] = {}
        self.published: dict[int, dict] = {}  # scan -> the flow record published (a late channel adds to it)
        self.leaving: float | None = None  # when we were asked to leave
        self.quiet = 0.0

    def run(self) -> None:
        rt = self.rt
        rt.meter.state = "streaming"
        Inbox([ch.pull for ch in self.channels]).serve(
            self.take, self.resend,
            lambda: (self.open > 0 or any(ch.queue for ch in self.channels)) and not rt.stop.is_set()
            and not (rt.leave.is_set() and self.may_leave()),
            park_poll_ms=HELD_POLL_MS, tick=self.tick)
        if rt.stop.is_set():
            raise InterruptedError("stopped")

    def may_leave(self) -> bool:
        """Asked to leave: we say so (producers send new scans to disk), relay the scans under way to
        their end, and go once none is open (for LEAVE_SETTLE s), or after LEAVE_WAIT s at most."""
        now = time.monotonic()
        if self.leaving is None:
            self.leaving = self.quiet = now
            self.rt.announce_leaving()
            log.info("%s: leaving: new scans go to disk; relaying the scans under way to their end", self.rt.label)
        if any(ch.scans or ch.queue for ch in self.channels):
            self.quiet = now
        if now - self.leaving > LEAVE_WAIT:
            open_scans = sorted({s for ch in self.channels for s in ch.scans})
            log.warning("%s: leaving with scans %s still open after %g s", self.rt.label, open_scans, LEAVE_WAIT)
            return True
        return now - self.quiet > LEAVE_SETTLE

    # -- receiving ---------------------------------------------------------------------------------
    def take(self, c: int, frames) -> _Channel | None:
        """Act on one message from channel c; the channel, to hold, if what it queued cannot go yet."""
        ch = self.channels[c]
        header = None
        try:
            header = messages.ours(frames[0], self.pipe)
            sender = header.get("sender")
            if not isinstance(sender, str) or sender not in ch.origins:
                raise Rejected("unknown sender", f"channel {c} hears only {sorted(ch.origins)}")
            kind = header.get("type")
            if sender in ch.ended and kind != "end" and not ch.finished:
                # It speaks after its `end`: that end was not its own (forged under its name).
                ch.ended.discard(sender)
                self.rejects.add("end contradicted by later messages", sender)
            if kind is None or kind == "data":
                self.data(ch, header, frames, sender)
            elif kind == "info":
                self.info(ch, header, frames, sender)
            elif kind == "done":
                self.done(ch, header, sender)
            elif kind == "end":
                self.end(ch, sender)
            else:
                raise Rejected("unknown message type", messages.brief(kind))
        except Rejected as exc:
            self.rejects.reject(exc, sender_of(header or exc.header))
            self._count_scan_reject(ch, header)
            return None
        except Exception as exc:  # a shape no check foresaw: still rejected and counted, never a crash
            self.rejects.add("malformed message", sender_of(header), exc.__class__.__name__)
            return None
        return ch if ch.queue and not self.resend(ch, time.monotonic()) else None

    def _count_scan_reject(self, ch: _Channel, header) -> None:
        scan = header.get("scan") if isinstance(header, dict) and header.get("pipe") == self.pipe else None
        st = ch.scans.get(scan) if type(scan) is int else None
        if st is not None:
            self.scan_totals.setdefault(st.id, _empty_totals())["rejected"] += 1

    def info(self, ch: _Channel, header: dict, frames, sender: str) -> None:
        if len(frames) != 1:
            raise Rejected("wrong number of frames", f"an info has 1, got {len(frames)}")
        scan = messages.scan_id(header)
        ngs = messages.node_groups(header.get("node_groups"))
        meta = messages.meta(header.get("meta"))
        if scan in ch.closed:
            raise Rejected("info for a closed scan", f"scan {scan}")
        st = ch.scans.get(scan)
        if st is None:
            st = ch.scans[scan] = _Scan(scan, list(ngs), meta)
            if scan > ch.latest:
                ch.latest = scan
                self.publish_closed()  # earlier scans this channel never saw need not wait for it
            self.scan_totals.setdefault(scan, _empty_totals())
            for g in st.node_groups:  # tell each node group before it gets a part of the scan from us
                self.queue_to(ch, g, messages.info(self.pipe, scan, ch.me, st.node_groups, meta), st, "info")
        elif ngs != st.node_groups:
            raise Rejected("info disagrees on node groups", f"scan {scan}: {ngs} vs {st.node_groups}")
        if sender in st.infos:
            raise Rejected("second info", f"scan {scan}")
        st.infos.add(sender)

    def data(self, ch: _Channel, header: dict, frames, sender: str) -> None:
        scan = header.get("scan")
        st = ch.scans.get(scan) if type(scan) is int else None
        if st is None or sender not in st.infos or sender in st.dones:
            if type(scan) is not int:
                raise Rejected("bad scan number", messages.brief(scan))
            raise Rejected("data out of turn", f"scan {scan}: no info from this sender yet, or after its done"
                           if scan not in ch.closed else f"scan {scan} is closed")
        if len(frames) != 2:
            raise Rejected("wrong number of frames", f"data has 2, got {len(frames)}")
        key = header.get(self.route)
        if type(key) is not int:
            raise Rejected("nothing to route by", f"no integer {self.route!r}")
        st.received += 1
        self.rt.meter.msgs_in += 1
        self.rt.meter.bytes_in += len(frames[1])
        ch.queue.append((self.target(st, key), frames, st, key))  # key: the item's, an int

    def done(self, ch: _Channel, header: dict, sender: str) -> None:
        scan = messages.scan_id(header)
        sent = messages.count(header.get("sent"), "sent count")
        st = ch.scans.get(scan)
        if st is None or sender not in st.infos:
            raise Rejected("done out of turn", f"scan {scan}: no info from this sender")
        if sender in st.dones:
            raise Rejected("second done", f"scan {scan}")
        st.dones[sender] = sent
        self.maybe_close(ch, st)

    def end(self, ch: _Channel, sender: str) -> None:
        if sender in ch.ended:
            raise Rejected("second end")
        open_scans = [st.id for st in ch.scans.values() if sender in st.infos and sender not in st.dones]
        if open_scans:
            raise Rejected("end before done", f"scans {open_scans} still open for this sender")
        ch.ended.add(sender)
        self.maybe_finish(ch)

    # -- routing -----------------------------------------------------------------------------------
    def queue_to(self, ch: _Channel, g: int, frames, st: _Scan | None, tag: str) -> None:
        """Queue a control message (`tag`: info, done or end) to node group g, after any `done` we owe it."""
        for owed in ch.owed.pop(g, ()):
            ch.queue.append((g, owed, None, "owed"))
        ch.queue.append((g, frames, st, tag))

    def target(self, st: _Scan, key: int) -> int | None:
        """The node group of the scan this item goes to: `key` mod their number, among those alive."""
        ngs = st.node_groups
        g = ngs[key % len(ngs)]
        if g in st.gone or g in st.left:
            alive = [x for x in ngs if x not in st.gone and x not in st.left]
            if not alive:
                return None
            g = alive[key % len(alive)]
            st.rerouted += 1
        return g

    def resend(self, ch: _Channel, now: float) -> bool:
        """Send what the channel has queued, in order; True once all of it went (or was counted lost).

        Queued entries are (node group, frames, scan, key): key is the item's key for data, else
        the control message's tag (info, done, end, or owed: a `done` of a scan we gave up on it in).
        """
        while ch.queue:
            g, frames, st, key = ch.queue[0]
            data = type(key) is int
            if key == "handback":  # a leaving node group's done: what it got, counted now that it all went
                frames = messages.done(self.pipe, st.id, ch.me, st.forwarded.get(g, 0), abandoned=True)
            if g is None:  # data with no node group of the scan alive
                ch.queue.popleft()
                st.undeliverable += 1
                ch.totals["undeliverable"] += 1
                continue
            try:
                if not ch.out.try_send(g, frames):
                    if not ch.since:
                        ch.since = now
                    return False
            except PeerGone as exc:
                ch.queue.popleft()
                if key == "owed":  # still gone: still owed
                    ch.owed.setdefault(g, []).append(frames)
                elif st is not None:
                    if g not in st.gone:
                        st.gone.add(g)
                        log.warning("%s channel %d: scan %d: %s; the rest of its share goes to the scan's other "
                                    "node groups", self.rt.label, ch.c, st.id, exc)
                    if data:
                        ch.queue.appendleft((self.target(st, key), frames, st, key))
                continue
            ch.queue.popleft()
            if data:
                nbytes = len(frames[1])
                st.forwarded[g] = st.forwarded.get(g, 0) + 1
                ch.totals["messages"] += 1
                ch.totals["bytes"] += nbytes
                self.rt.meter.msgs_out += 1
                self.rt.meter.bytes_out += nbytes
            elif key == "info":
                st.told.add(g)
        if ch.since:
            self.rt.meter.blocked_s += now - ch.since
            ch.since = 0.0
        return True

    # -- ends of scans and of the stream -----------------------------------------------------------
    def maybe_close(self, ch: _Channel, st: _Scan) -> None:
        """Every producer thread said done (or is gone, or ended): tell each node group what it got."""
        if st.closed or any(s not in st.dones and s not in ch.gone and s not in ch.ended for s in ch.origins):
            return
        st.closed = True
        for g in st.node_groups:
            if g in st.left:
                continue  # handed its done when it began to leave
            done = messages.done(self.pipe, st.id, ch.me, st.forwarded.get(g, 0), abandoned=g in st.gone)
            if g not in st.gone:
                self.queue_to(ch, g, done, st, "done")
            elif g in st.told:  # should it come back (it froze), it learns we gave up on it for this scan
                ch.owed.setdefault(g, []).append(done)
        ch.closed.add(st.id)
        if len(ch.closed) > 100_000:
            ch.closed.discard(min(ch.closed))
        del ch.scans[st.id]
        self.closed_on_channel(ch, st)

    def closed_on_channel(self, ch: _Channel, st: _Scan) -> None:
        """Our flow record of the scan, once every channel has closed it."""
        tot = self.scan_totals.setdefault(st.id, self.published.pop(st.id, None) or _empty_totals())
        tot["received"] += st.received
        tot["undeliverable"] += st.undeliverable
        tot["rerouted"] += st.rerouted
        ch.totals["rerouted"] += st.rerouted
        for g in st.gone:
            tot["gave_up_on"][str(g)] = tot["gave_up_on"].get(str(g), 0) + st.forwarded.get(g, 0)
        for g in st.left:
            tot["left"][str(g)] = tot["left"].get(str(g), 0) + st.forwarded.get(g, 0)
        for g, n in st.forwarded.items():
            tot["forwarded"][str(g)] = tot["forwarded"].get(str(g), 0) + n
        tot["producers_gone"] += sorted(s for s in ch.origins if s in ch.gone and s not in st.dones)
        self.scan_channels.setdefault(st.id, set()).add(ch.c)
        self.publish_closed()

    def publish_closed(self) -> None:
        """Publish the flow record of every scan that each channel has closed or will never see: it
        finished, or it has moved on to a later scan (a producer that gave this one up). A channel
        that closes a scan after that (its producer came back) adds to the record, never replaces it."""
        for scan, done in list(self.scan_channels.items()):
            if all(ch.c in done or ch.finished or ch.latest > scan for ch in self.channels):
                totals = self.scan_totals.pop(scan)
                flow.publish_scan(self.rt, scan, done=True, **totals)
                del self.scan_channels[scan]
                self.published[scan] = totals
                while len(self.published) > 256:
                    self.published.pop(next(iter(self.published)))

    def maybe_finish(self, ch: _Channel) -> None:
        """The channel is done once every producer thread of it ended (its `end`, corroborated by the
        producer's own record in the registry: an `end` alone may be forged) or is gone (in a pipeline
        of services, a producer that is gone may come back: only its end finishes the channel)."""
        service = self.rt.plan.service
        if ch.finished or any(s not in ch.ended and (s not in ch.gone or service) for s in ch.origins):
            return
        producer, roster = self.rt.plan.producer, self.rt.roster
        if any(s not in ch.gone for s in ch.origins) and not (
                roster.ended(producer, ch.c, self.pipe) or roster.gone(producer, ch.c)):
            return  # its end record is not there yet (or the end was not its own): look again at the next tick
        for st in list(ch.scans.values()):  # scans an origin that is gone never closed
            self.maybe_close(ch, st)
        ch.finished = True
        ch.out.refresh()
        for g in ch.out.replicas():
            self.queue_to(ch, g, messages.end(self.pipe, ch.me), None, "end")
        self.open -= 1
        self.publish_closed()

    def tick(self, now: float) -> None:
        """Look at the producers: one that is gone will send nothing more (its scans close without it)."""
        plan = self.rt.plan
        for ch in self.channels:
            if ch.finished:
                continue
            if ch.ended:
                self.maybe_finish(ch)
            why = self.rt.roster.departed(plan.producer, ch.c, self.pipe)
            if why:
                newly = set(ch.origins) - ch.gone - ch.ended
                if newly:
                    log.warning("%s channel %d: %s[%d] %s; its open scans close without it", self.rt.label,
                                ch.c, plan.producer, ch.c, why)
                    ch.gone |= newly
                    for st in list(ch.scans.values()):
                        self.maybe_close(ch, st)
                    self.maybe_finish(ch)
            elif ch.gone and self.rt.roster.alive(plan.producer, ch.c):
                log.info("%s channel %d: %s[%d] is back", self.rt.label, ch.c, plan.producer, ch.c)
                ch.gone.clear()
            self.look_for_leaving(ch)
            if ch.queue:
                self.resend(ch, now)

    def look_for_leaving(self, ch: _Channel) -> None:
        """A node group of an open scan that began to leave, while others of the scan stay: nothing
        new goes to it, and it gets our done, counted when everything queued to it went."""
        roster, node = self.rt.roster, self.rt.plan.node_group
        for st in ch.scans.values():
            for g in st.node_groups:
                if g in st.gone or g in st.left or not roster.leaving(node, g):
                    continue
                if any(x != g and x not in st.gone and x not in st.left and not roster.leaving(node, x)
                       and not roster.gone(node, x) for x in st.node_groups):
                    st.left.add(g)
                    log.info("%s channel %d: scan %d: %s[%d] is leaving; the rest of its share goes to the scan's "
                             "other node groups", self.rt.label, ch.c, st.id, node, g)
                    ch.queue.append((g, None, st, "handback"))


def _empty_totals() -> dict:
    return {"received": 0, "rejected": 0, "undeliverable": 0, "rerouted": 0, "forwarded": {}, "producers_gone": [],
            "gave_up_on": {}, "left": {}}
