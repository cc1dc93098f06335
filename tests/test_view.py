"""The view's arithmetic and layout, from hand-made status snapshots: rates, scan progress, grouping, 80 columns."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from zpipe.view import Tracker, collapse, plain_line, rate, render, to_json

PART = 165888  # bytes in one 4D-Camera sector


def snap(node, replica, role, t, n_in=0, n_out=0, *, blocked=0.0, scans=None, state="streaming", pid=None,
         host="localhost", warnings=(), errors=0):
    return {"node": node, "replica": replica, "role": role, "host": host, "pid": pid or 100 + replica,
            "state": state, "scan": 1, "time": t, "started": 0.0, "msgs_in": n_in, "bytes_in": n_in * PART,
            "msgs_out": n_out, "bytes_out": n_out * PART, "blocked_s": blocked, "rejected": 0, "errors": errors,
            "queue": 0, "queue_max": 0, "scans": scans or {}, "warnings": list(warnings)}


def pipeline(tracker: Tracker, t: float, k: float, producers: int = 4, groups: int = 2, host="localhost",
             warnings=()) -> None:
    """One publication of the 4D-Camera pipeline, `k` seconds into a steady 2,000 parts/s."""
    for i in range(producers):
        tracker.on_change(f"status/producer/{i}", snap("producer", i, "producer", t, 0, int(500 * k),
                                                        blocked=0.25 * k, host=host))
    tracker.on_change("status/aggregator/0", snap("aggregator", 0, "aggregator", t, int(2000 * k), int(2000 * k),
                                                          warnings=warnings))
    for i in range(groups):
        got = int(1000 * k)
        tracker.on_change(f"status/nodegroup/{i}", snap("nodegroup", i, "nodegroup", t, got, 0,
                                                         scans={"1": {"received": got, "expected": 8192}}))


@pytest.mark.timeout(10)
def test_rate_between_two_snapshots():
    a = snap("aggregator", 0, "aggregator", 100.0, 1000, 1000, blocked=1.0)
    b = snap("aggregator", 0, "aggregator", 102.0, 5000, 4000, blocked=2.0)
    r = rate(a, b)
    assert r["msgs_in_s"] == 2000 and r["msgs_out_s"] == 1500
    assert r["bytes_in_s"] == 2000 * PART and r["blocked"] == 0.5
    assert rate(a, a) is None  # no time between them
    assert rate(a, {**b, "pid": 999}) is None  # a restarted process counts from zero again


@pytest.mark.timeout(10)
def test_tracker_rates_scan_progress_and_time_left():
    tr = Tracker()
    tr.on_change("scans/1", {"scan": 1, "status": "streaming", "node_groups": [0, 1], "started": time.time() - 3})
    pipeline(tr, 1000.0, 1)
    pipeline(tr, 1000.0, 1)  # the same publication twice (snapshot, then update) counts once
    pipeline(tr, 1001.0, 2)
    p = tr.picture()
    rows = {r.label: r for r in p.rows}
    assert list(rows) == ["producer[0]", "producer[1]", "producer[2]", "producer[3]", "aggregator[0]",
                          "nodegroup[0]", "nodegroup[1]"]  # grouped by role, in pipeline order
    assert rows["producer[2]"].msg_s == 500 and rows["producer[2]"].rates["blocked"] == 0.25
    assert rows["aggregator[0]"].rates["bytes_out_s"] == 2000 * PART
    assert rows["nodegroup[1]"].msg_s == 1000
    (scan,) = p.scans
    assert (scan.received, scan.expected, scan.rate) == (4000, 16384, 2000)
    assert scan.eta == pytest.approx((16384 - 4000) / 2000)
    assert "scan 1 streaming 4,000/16,384 24% 2,000 msg/s 0:06 left" in plain_line(p)


@pytest.mark.timeout(10)
def test_finished_and_vanished_replicas_and_reports():
    tr = Tracker()
    tr.on_change("scans/1", {"scan": 1, "status": "done", "node_groups": [0], "started": 10.0, "finished": 19.5})
    tr.on_change("status/producer/0", snap("producer", 0, "producer", 1.0, 0, 10))
    tr.on_change("status/producer/0", snap("producer", 0, "producer", 2.0, 0, 20, state="done"))
    tr.on_change("status/producer/0", None)  # withdrawn as the process exits
    tr.on_change("status/nodegroup/0", snap("nodegroup", 0, "nodegroup", 2.0, 5, 0))
    tr.on_change("status/nodegroup/0", None)  # vanished while streaming: it died
    tr.on_change("scans/1/part/0", {"received": 40, "sent": 40, "final": True})
    tr.expect("aggregator", 0, "aggregator", "localhost")
    p = tr.picture()
    assert {r.label: r.state for r in p.rows} == {"producer[0]": "done", "aggregator[0]": "starting",
                                                   "nodegroup[0]": "gone"}
    assert all(r.rates is None for r in p.rows)  # nothing moves any more
    (scan,) = p.scans
    assert (scan.status, scan.received, scan.expected, scan.elapsed) == ("done", 40, 40, 9.5)


@pytest.mark.timeout(10)
def test_many_replicas_collapse_into_one_summed_row_per_node():
    tr = Tracker()
    for t, k in ((1000.0, 1), (1001.0, 2)):
        pipeline(tr, t, k, producers=12, groups=8)
    tr.on_change("status/nodegroup/7", snap("nodegroup", 7, "nodegroup", 1001.5, 20, 0, state="idle", host="far",
                                            pid=999))  # restarted elsewhere
    rows = collapse(tr.picture().rows)
    assert [r.label for r in rows] == ["producer ×12", "aggregator[0]", "nodegroup ×8"]
    prod, _, ng = rows
    assert prod.msg_s == 12 * 500 and prod.rates["blocked"] == 0.25  # blocked: a replica's average
    assert ng.state == "streaming 7/8" and ng.host == "2 hosts"
    assert ng.msg_s == 7 * 1000  # the idle one, restarted with one publication, has no rate yet
    assert [r.label for r in collapse(tr.picture().rows, above=1)][1] == "aggregator[0]"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("producers,host", [(4, "localhost"), (12, "receiving-server-17.detector.example.org")])
def test_fits_80_columns(producers, host):
    tr = Tracker()
    tr.on_change("scans/1", {"scan": 1, "status": "streaming", "node_groups": [0, 1], "started": time.time() - 3})
    pipeline(tr, 1000.0, 1, producers=producers, host=host)
    pipeline(tr, 1001.0, 200, producers=producers, host=host,  # rates of a million a second: the widest
             warnings=["12:00:01 aggregator[0].in rejected a message from intruder: a long reason " + "x" * 200])
    console = Console(width=80, record=True, color_system=None)
    console.print(render(tr.picture(), "4dcamera-local · registry tcp://127.0.0.1:5555", 80, 40))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    labels = ["producer ×12"] if producers > 4 else [f"producer[{i}]" for i in range(4)]
    for label in [*labels, "aggregator[0]", "nodegroup[0]", "nodegroup[1]"]:
        assert any(line.startswith(label) for line in lines), (label, text)
    assert "scan 1 streaming" in text and "400,000/16,384" in text
    assert "warnings:" in text and "aggregator[0] 12:00:01 aggregator[0].in rejected" in text
    assert "398,000" in text and "66.02" in text and "err" in lines[1]  # numbers and headers are never cut


@pytest.mark.timeout(10)
def test_a_short_terminal_gets_one_row_per_node():
    tr = Tracker()
    pipeline(tr, 1000.0, 1, producers=4, groups=4)
    console = Console(width=80, height=20, record=True)
    console.print(render(tr.picture(), "", 80, 20))
    text = console.export_text()
    assert "producer ×4" in text and "nodegroup ×4" in text and "producer[0]" not in text


@pytest.mark.timeout(10)
def test_json_lists_every_replica_with_rates_and_every_scan():
    tr = Tracker()
    tr.on_change("scans/1", {"scan": 1, "status": "streaming", "node_groups": [0, 1], "started": time.time()})
    pipeline(tr, 1000.0, 1)
    pipeline(tr, 1001.0, 2)
    data = to_json(tr.picture())
    assert [(n["node"], n["replica"]) for n in data["nodes"]] == [
        *[("producer", i) for i in range(4)], ("aggregator", 0), ("nodegroup", 0), ("nodegroup", 1)]
    assert data["nodes"][4]["rates"]["msgs_in_s"] == 2000 and data["nodes"][4]["msgs_in"] == 4000
    assert data["scans"][0]["status"] == "streaming" and data["scans"][0]["rate"] == 2000


@pytest.mark.timeout(10)
def test_nothing_running_says_so():
    console = Console(width=80, record=True)
    console.print(render(Tracker().picture(), "registry tcp://127.0.0.1:5555", 80, 40))
    assert "no node replica is publishing status" in console.export_text()


@pytest.mark.timeout(10)
def test_display_plain_lines_when_not_a_terminal_and_relay_above_when_live():
    import io

    from zpipe.view import Display

    tr = Tracker()
    pipeline(tr, 1000.0, 1)
    pipeline(tr, 1001.0, 2)
    out = io.StringIO()
    plain = Display(tr, Console(file=out), every=0.05).start()
    assert not plain.live and not plain.relay("[node[0]] hello")  # the runner prints it itself
    time.sleep(0.3)
    plain.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines  # nothing changed but the time: one line, not one per tick
    assert "producer×4 streaming 0.33 GB/s | aggregator[0] streaming 0.33 GB/s" in lines[0]

    term = io.StringIO()
    live = Display(tr, Console(file=term, force_terminal=True, width=80), "t").start()
    assert live.live and live.relay("[nodegroup[0]] INFO a relayed line")
    live.stop()
    live.stop()  # idempotent
    text = term.getvalue()
    assert "[nodegroup[0]] INFO a relayed line" in text and "aggregator[0]" in text
