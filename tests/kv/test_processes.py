"""The KV store with a real server process and real client processes.

The server runs as ``python -m zpipe.kv``; clients run this file as a script (see
``worker`` at the bottom), taking JSON commands on stdin and answering on stdout,
so that a test can SIGKILL any of them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
HEARTBEAT = 0.3


class Proc:
    """A child process that speaks one JSON line per request and per answer."""

    def __init__(self, args: list[str], stderr=None):
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.popen.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = self.popen.stdout.readline()
                if not line:
                    raise RuntimeError(f"{self.popen.args} exited with {self.popen.wait()}")
                return line.strip()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no answer from {self.popen.args} in {timeout} s")

    def call(self, **request) -> dict:
        self.popen.stdin.write(json.dumps(request) + "\n")
        self.popen.stdin.flush()
        # A request with its own timeout gets that long, plus time to answer.
        return json.loads(self.readline(request.get("timeout", 0) + 20))

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        """Ask politely (SIGTERM), then insist."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.popen.stdin, self.popen.stdout):
            stream.close()


@pytest.fixture
def spawn():
    """Start processes: ``spawn.server(bind)`` and ``spawn.client(address, name)``;
    every one is stopped at teardown, whatever happened."""
    procs: list[Proc] = []

    class Spawn:
        @staticmethod
        def server(bind: str = "tcp://127.0.0.1:0", stderr=None) -> tuple[Proc, str]:
            proc = Proc(["-m", "zpipe.kv", "--bind", bind, "--heartbeat", str(HEARTBEAT)], stderr=stderr)
            procs.append(proc)
            return proc, proc.readline(timeout=20)

        @staticmethod
        def client(address: str, name: str) -> Proc:
            proc = Proc([__file__, address, name])
            procs.append(proc)
            assert json.loads(proc.readline(timeout=20)) == {"ready": name}
            return proc

    try:
        yield Spawn
    finally:
        for proc in procs:
            proc.stop()


def dump(proc: Proc) -> dict:
    return proc.call(op="dump")


@pytest.mark.timeout(90)
def test_late_joiner_holds_the_state_of_those_that_saw_every_update(spawn):
    _, address = spawn.server()
    writer = spawn.client(address, "writer")
    watcher = spawn.client(address, "watcher")
    writer.call(op="fill", n=10_000)
    for proc in (writer, watcher):
        assert proc.call(op="wait", key="fill/done", value=True, timeout=60)["ok"]
    late = spawn.client(address, "late")
    states = [dump(p) for p in (writer, watcher, late)]
    assert states[0]["seq"] > 10_000  # sets and deletes, each one update
    assert len(states[0]["items"]) > 1000
    for state in states[1:]:
        assert state["items"] == states[0]["items"]
        assert state["seq"] == states[0]["seq"]


@pytest.mark.timeout(90)
def test_killed_and_restarted_server_is_repopulated_by_its_clients(spawn):
    server, address = spawn.server()
    names = ["w0", "w1", "w2"]
    clients = [spawn.client(address, name) for name in names]
    for proc, name in zip(clients, names):
        proc.call(op="set", key=f"own/{name}", value={"name": name})
        proc.call(op="set", key=f"eph/{name}", value=name, ttl=1.5)
        proc.call(op="writer", interval=0.05)  # keeps writing ctr/<name> throughout
    for proc in clients:
        assert proc.call(op="wait_count", count=9, timeout=20)["ok"]
    old_epoch = dump(clients[0])["epoch"]

    server.kill()
    time.sleep(0.5)  # clients keep writing into the void meanwhile
    restarted = time.monotonic()
    _, again = spawn.server(address)
    assert again == address
    time.sleep(1.0)  # writes go on across the switch-over
    last = {name: proc.call(op="stop_writer")["last"] for proc, name in zip(clients, names)}

    expected = {f"own/{n}": {"name": n} for n in names}
    expected.update({f"eph/{n}": n for n in names})
    expected.update({f"ctr/{n}": last[n] for n in names})
    deadline = restarted + 10
    while True:
        states = [dump(proc) for proc in clients]
        if all(s["epoch"] != old_epoch and s["items"] == expected for s in states):
            break
        assert time.monotonic() < deadline, f"not converged: {states}"
        time.sleep(0.1)
    converged = time.monotonic() - restarted
    print(f"converged {converged:.2f} s after the restart (writers ran 1.0 s of it)")
    assert converged < 6.0
    # A newcomer gets the same state from the new server.
    assert dump(spawn.client(address, "late"))["items"] == expected


@pytest.mark.timeout(60)
def test_ephemeral_keys_of_a_killed_client_expire_within_their_ttl(spawn):
    from zpipe.kv import KVClient

    ttl = 1.0
    _, address = spawn.server()
    victim = spawn.client(address, "victim")
    victim.call(op="set", key="eph/victim", value=1, ttl=ttl)
    victim.call(op="set", key="plain/victim", value=2)
    observer = KVClient(address, name="observer").start()
    try:
        observer.wait(lambda items: len(items) == 2)
        victim.kill()
        killed = time.monotonic()
        observer.wait(lambda items: "eph/victim" not in items, timeout=10)
        took = time.monotonic() - killed
        print(f"ephemeral key gone {took:.2f} s after SIGKILL (ttl {ttl} s)")
        # The server expires it at most ttl after the last refresh, which came
        # before the kill; the slack is for the server's 50 ms tick and a busy box.
        assert took < ttl + 0.5
        assert observer.items() == {"plain/victim": 2}  # ordinary keys stay
    finally:
        observer.close()


# -- malformed messages and outsiders, against processes -------------------------

ORIGIN = b"\x99" * 8 + (1).to_bytes(8, "big")


def collector_of(address: str) -> str:
    import zmq

    from zpipe.kv import protocol as p

    with zmq.Context.instance().socket(zmq.DEALER) as d:
        d.linger = 0
        d.connect(address)
        d.send_multipart([p.HELLO, b"1", b""])
        assert d.poll(10_000)
        return p.unpack(d.recv_multipart()[2])


@pytest.mark.timeout(60)
def test_bodies_that_are_not_msgpack_never_reach_client_processes(spawn):
    """Once, one such body through the collector killed the agent of every client
    (runner and nodes) and of every client that joined after."""
    import zmq

    from zpipe.kv import protocol as p

    _, address = spawn.server()
    clients = [spawn.client(address, f"w{i}") for i in range(2)]
    clients[0].call(op="set", key="g/mine", value=1, ttl=5.0)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(collector_of(address)["collector"])
    try:
        bodies = [b"\xc1", b"\x92\x01", b"\x01\x02", b"\xa2\xff\xfe", b"\x91" * 5000 + b"\x00"]
        for i in range(1000):
            key = "g/mine" if i % 2 else f"g/{i % 7}"
            push.send_multipart([key.encode(), p.pack([None, False, ORIGIN]), bodies[i % len(bodies)]])
    finally:
        push.close(linger=5000)  # all of them out
    clients[1].call(op="set", key="after", value=True)
    late = spawn.client(address, "late")
    for proc in (*clients, late):
        assert proc.call(op="wait", key="after", value=True, timeout=5)["ok"]
        state = dump(proc)
        assert {k: v for k, v in state["items"].items() if k.startswith("g/")} == {"g/mine": 1}
        assert state["rejected"] == {}


@pytest.mark.timeout(60)
def test_a_flood_of_garbage_starves_neither_heartbeats_nor_expiry(spawn, tmp_path):
    """Two raw sockets send malformed messages as fast as the server takes them;
    meanwhile its heartbeats keep their pace and a killed client's key expires."""
    import zmq

    from zpipe.kv import KVClient, protocol as p

    errors = tmp_path / "server.err"
    with open(errors, "w") as err:
        server, address = spawn.server(stderr=err)
    info = collector_of(address)
    victim = spawn.client(address, "victim")
    ttl = 1.0
    victim.call(op="set", key="eph/victim", value=1, ttl=ttl)
    observer = KVClient(address, name="observer").start()
    ctx = zmq.Context.instance()
    beats = ctx.socket(zmq.SUB)
    beats.linger = 0
    beats.subscribe(p.HEARTBEAT_TOPIC)
    beats.connect(info["pub"])
    stop = threading.Event()
    sent = {"collector": 0, "router": 0}
    collector_garbage = [
        [b"g/1", b"\xc1", b"x"], [b"g/1", p.pack(["5", False, ORIGIN]), p.pack(1)],
        [b"g/1", p.pack([None, False, ORIGIN]), b"\xc1"], [b"\xff", b"", b""], [b"x"],
    ]
    router_garbage = [[p.SNAPSHOT, b"1", b"\xc1"], [p.SNAPSHOT, b"1", p.pack([1])], [b"BOGUS", b"1", b""], [b"x"]]

    def flood(kind: int, where: str, garbage: list) -> None:
        with ctx.socket(kind) as s:
            s.linger = 0
            s.connect(where)
            i = 0
            while not stop.is_set():
                try:
                    s.send_multipart(garbage[i % len(garbage)], zmq.NOBLOCK)
                    i += 1
                except zmq.Again:
                    time.sleep(0.0005)  # the server is behind: it sets the pace
            sent["collector" if kind == zmq.PUSH else "router"] = i

    threads = [
        threading.Thread(target=flood, args=(zmq.PUSH, info["collector"], collector_garbage)),
        threading.Thread(target=flood, args=(zmq.DEALER, address, router_garbage)),
    ]
    try:
        observer.wait(lambda items: "eph/victim" in items)
        resyncs = observer.resyncs
        for t in threads:
            t.start()
        times = []
        t0 = time.monotonic()
        killed = None
        took = None
        while time.monotonic() - t0 < 1.8:
            if beats.poll(50):
                beats.recv_multipart()
                times.append(time.monotonic())
            if killed is None and time.monotonic() - t0 > 0.3:
                victim.kill()
                killed = time.monotonic()
            if killed and took is None and "eph/victim" not in observer.items():
                took = time.monotonic() - killed
        stop.set()
        for t in threads:
            t.join()
        gaps = [b - a for a, b in zip(times, times[1:])]
        print(f"flood of {sent['collector']} collector + {sent['router']} request messages in 1.8 s: "
              f"{len(times)} heartbeats (every {HEARTBEAT} s), longest gap {max(gaps):.3f} s; "
              f"ephemeral key gone {took} s after SIGKILL (ttl {ttl} s)")
        assert sent["collector"] > 1000 and sent["router"] > 1000
        assert max(gaps) < HEARTBEAT + 0.5
        assert took is not None and took < ttl + 0.5
        assert observer.resyncs == resyncs
        observer_alive = observer._thread.is_alive()
        assert observer_alive
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        beats.close(0)
        observer.close()
    assert server.popen.poll() is None  # still running
    server.stop()
    log = errors.read_text().splitlines()
    reasons = [line for line in log if "dropped a malformed message" in line]
    print("\n".join(reasons))
    # One line per reason, whatever the number of messages (9 kinds were sent).
    assert len(reasons) == len(set(reasons)) and 1 <= len(reasons) <= 9, log


@pytest.mark.timeout(60)
def test_an_owner_process_restores_what_an_outsider_overwrote_or_deleted(spawn):
    from zpipe.kv import KVClient

    _, address = spawn.server()
    owner = spawn.client(address, "owner")
    key = "endpoints/n/0/out"
    owner.call(op="set", key=key, value="owner's", ttl=3.0)
    outsider = KVClient(address, name="outsider").start()
    observer = KVClient(address, name="observer").start()
    seen: list[tuple[float, object]] = []
    observer.on_change(lambda k, v: k == key and seen.append((time.monotonic(), v)))
    try:
        observer.wait(lambda items: items.get(key) == "owner's")

        def undone(value, action) -> float:
            n = len(seen)  # before the action: its echo can come back before we look
            action()
            t0 = time.monotonic()
            while not any(v == value for _, v in seen[n:]):
                assert time.monotonic() - t0 < 5, seen
                time.sleep(0.001)
            i = next(j for j in range(n, len(seen)) if seen[j][1] == value)
            while not any(v == "owner's" for _, v in seen[i:]):
                assert time.monotonic() - t0 < 5, seen
                time.sleep(0.001)
            j = next(j for j in range(i, len(seen)) if seen[j][1] == "owner's")
            return seen[j][0] - seen[i][0]

        # A plain write: the outsider lets go once undone.
        overwrite = undone("outsider's", lambda: outsider.set(key, "outsider's"))
        deletion = undone(None, lambda: outsider.delete(key))
        time.sleep(0.3)
        for client in (outsider, observer):
            assert client.get(key) == "owner's"
        print(f"owner process restored its key {overwrite * 1000:.1f} ms after an overwrite "
              f"and {deletion * 1000:.1f} ms after a deletion")
        assert overwrite < 0.1 and deletion < 0.1
        assert dump(owner)["restored"] == {key: 2}
    finally:
        outsider.close()
        observer.close()


# -- the client process ------------------------------------------------------------


def worker(address: str, name: str) -> None:
    from zpipe.kv import KVClient

    client = KVClient(address, name=name, heartbeat_timeout=1.5).start()
    stop_writer = threading.Event()
    written = {"last": None}
    writers: list[threading.Thread] = []

    def write_forever(interval: float) -> None:
        i = 0
        while not stop_writer.is_set():
            i += 1
            client.set(f"ctr/{name}", i)
            written["last"] = i
            time.sleep(interval)

    def answer(**reply) -> None:
        print(json.dumps(reply), flush=True)

    answer(ready=name)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "set":
            client.set(req["key"], req["value"], ttl=req.get("ttl"))
            answer(ok=True)
        elif op == "fill":
            # Overwrites and deletes, so the final state is not just the last writes.
            for i in range(req["n"]):
                key = f"fill/{i % 3000}"
                if i % 7 == 3 and i > 3000:
                    client.delete(key)
                else:
                    client.set(key, {"i": i, "by": name})
            client.set("fill/done", True)
            answer(ok=True)
        elif op == "wait":
            try:
                client.wait(lambda items: items.get(req["key"]) == req["value"], timeout=req["timeout"])
                answer(ok=True)
            except TimeoutError:
                answer(ok=False)
        elif op == "wait_count":
            try:
                client.wait(lambda items: len(items) >= req["count"], timeout=req["timeout"])
                answer(ok=True)
            except TimeoutError:
                answer(ok=False)
        elif op == "writer":
            writers.append(threading.Thread(target=write_forever, args=(req["interval"],)))
            writers[-1].start()
            answer(ok=True)
        elif op == "stop_writer":
            stop_writer.set()
            for thread in writers:
                thread.join()
            answer(last=written["last"])
        elif op == "dump":
            answer(items=client.items(), seq=client.sequence, epoch=client.epoch, resyncs=client.resyncs,
                   rejected=client.rejected, restored=client.restored)
    client.close()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
