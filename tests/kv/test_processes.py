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

    def __init__(self, args: list[str]):
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
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
        def server(bind: str = "tcp://127.0.0.1:0") -> tuple[Proc, str]:
            proc = Proc(["-m", "zpipe.kv", "--bind", bind, "--heartbeat", str(HEARTBEAT)])
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
            answer(items=client.items(), seq=client.sequence, epoch=client.epoch, resyncs=client.resyncs)
    client.close()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
