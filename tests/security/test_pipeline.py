"""A secured pipeline (issue 12): `zpipe run` with `security:` runs the 4D-Camera job exactly, while
outsiders and a peer with a valid key but the wrong identity try the registry and the data sockets.

Real processes on loopback; each `zpipe run` has a timeout and is killed by its process group."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from support import TOPOLOGIES
from zpipe import security
from zpipe.kv import KVClient, protocol as p

RUN_TIMEOUT = 300


def topology(tmp_path, security_yaml: str, shape=(32, 32), delay=0.03) -> str:
    """The README's main job, smaller, paced by a slow analysis (so outsiders get their turn), secured."""
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text()
    for old, new in ((f"scan_shape: [64, 64]", f"scan_shape: [{shape[0]}, {shape[1]}]"),
                     ("- plugin: electron-count   # thresholds from the first 1200 complete frames, as at NCEM",
                      f"- plugin: discard\n        params: {{delay: {delay}}}")):
        assert old in text, old
        text = text.replace(old, new)
    f = tmp_path / "secured.yaml"
    f.write_text(text + "\n" + security_yaml)
    return str(f)


class Run:
    def __init__(self, path, out):
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "run.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "zpipe", "run", path, "--output-dir", str(out)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def registry(self, timeout=60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"registry at (tcp://\S+)", open(self.log.name).read())
            if m:
                return m.group(1)
            assert self.proc.poll() is None, open(self.log.name).read()
            time.sleep(0.1)
        raise TimeoutError("zpipe run printed no registry address")

    def wait(self, timeout=RUN_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return open(self.log.name).read()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.log.close()


def raw_push(address, curve=None, server=None):
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.linger = 0
    s.sndtimeo = 0
    if curve is not None:
        s.curve_publickey, s.curve_secretkey = curve
        s.curve_serverkey = server
    s.connect(address)
    return s


def forge(sock, n=50):
    """Messages that would count as data if they got in (a header of the right shape, a sector's bytes)."""
    from zpipe import wire

    sent = 0
    for i in range(n):
        try:
            sock.send_multipart([wire.pack_header({"kind": "data", "scan": 1, "frame_number": 1000 + i, "module": 0}),
                                 b"\0" * 165_888], zmq.NOBLOCK)
            sent += 1
        except (zmq.Again, Exception):
            pass
    return sent


@pytest.mark.slow  # ~22 s: the default run stays near 10 min; tests/security/test_netns.py attacks a secured pipeline across hosts in it
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_secured_pipeline_is_exact_under_attack(tmp_path):
    keys = tmp_path / "keys"
    path = topology(tmp_path, "security: {keys: keys, registry: curve, data: curve, links: {aggregator.in: allow}}\n")
    r = subprocess.run([sys.executable, "-m", "zpipe", "keys", str(keys), "--topology", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    run = Run(path, out)
    try:
        registry = run.registry()
        reg_pub = security.load_public(str(keys), "registry")
        ng_pub = security.load_public(str(keys), "nodegroup")
        viewer = KVClient(registry, name="test-operator", curve=security.credentials(str(keys), "operator"),
                          connect_timeout=30).start()
        try:
            target = "endpoints/nodegroup/0/data@0"
            eps = viewer.wait(lambda items: target in items, prefix="endpoints/", timeout=60)
            address = eps[target]["address"]
            # 1. An outsider reads nothing from the registry: no HELLO answered without a known key.
            with zmq.Context.instance().socket(zmq.DEALER) as d:
                d.linger = 0
                d.connect(registry)
                d.send_multipart([p.HELLO, b"1", b""])
                assert not d.poll(1000)
            # 2. Forged data at a node group's socket: no key, an unknown key, a valid key of the wrong identity.
            stranger = zmq.curve_keypair()
            producer = security.load_secret(str(keys), "producer")
            socks = [raw_push(address), raw_push(address, stranger, ng_pub), raw_push(address, producer, ng_pub)]
            # 3. The producer's valid registry key, writing the node group's endpoint and deleting its liveness key
            forger = KVClient(registry, name="forger", curve=security.credentials(str(keys), "producer"),
                              connect_timeout=30).start()
            # 4. Node group 1's own registry key (each replica has one), writing node group 0's endpoint
            sibling = KVClient(registry, name="sibling", curve=security.credentials(str(keys), "nodegroup.1"),
                               connect_timeout=30).start()
            try:
                forger.set(target, {**eps[target], "address": "tcp://127.0.0.1:9"}, ttl=5)
                forger.delete("nodes/nodegroup/1")
                sibling.set(target, {**eps[target], "address": "tcp://127.0.0.1:9"}, ttl=5)
                for s in socks:
                    forge(s)
                # Counted, named, visible: the registry's count of refused writes, the node group's refusals
                denied = viewer.wait(lambda items: (items.get("security/denied/producer") or {}).get("writes", 0) >= 2,
                                     prefix="security/", timeout=30)["security/denied/producer"]
                assert denied["last_key"] in (target, "nodes/nodegroup/1")
                denied = viewer.wait(lambda items: "security/denied/nodegroup.1" in items, prefix="security/",
                                     timeout=30)["security/denied/nodegroup.1"]
                assert denied["writes"] >= 1 and denied["last_key"] == target
                assert viewer.get(target)["address"] == address  # the owner's key untouched
            finally:
                forger.close(withdraw=False)
                sibling.close(withdraw=False)
            # `zpipe status` with the operator's key shows them; without a key it gets no answer
            shown = subprocess.run([sys.executable, "-m", "zpipe", "status", "--registry", registry, "--keys",
                                    str(keys), "--json", "--sample", "0.2"], capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["security"]["security/denied/producer"]["writes"] >= 2
            blind = subprocess.run([sys.executable, "-m", "zpipe", "status", "--registry", registry, "--once",
                                    "--connect-timeout", "2"], capture_output=True, text=True, timeout=60)
            assert blind.returncode == 2 and "no answer" in blind.stderr
            st = viewer.wait(lambda items: (items.get("status/nodegroup/0") or {}).get("refused", 0) >= 2,
                             prefix="status/", timeout=30)["status/nodegroup/0"]
            assert any("refused a connection" in w for w in st["warnings"]), st["warnings"]
            table = subprocess.run([sys.executable, "-m", "zpipe", "status", "--registry", registry, "--keys",
                                    str(keys), "--once", "--sample", "0.2"], capture_output=True, text=True, timeout=60)
            assert table.returncode == 0, table.stderr
            line = next(x for x in table.stdout.splitlines() if x.startswith("security: "))
            assert re.search(r"writes refused: nodegroup\.1 \d+, producer \d+", line), line
            assert re.search(r"connections refused at data sockets: .*nodegroup\[0\] \d+", line), line
            for s in socks:
                s.close(0)
        finally:
            viewer.close()
        rc = run.wait()
        text = run.text()
        assert rc == 0, text[-3000:]
        report = json.loads((out / "scan_1_report.json").read_text())
        # Exact: every sector the producers sent arrived, nothing forged was counted or rejected as data
        assert report["outcome"] == "complete", report
        assert report["expected"] == report["received"] == report["sent"] == 4096
        assert report["rejected"] == 0 and report["complete"] == 1024
        assert "refused a write of 'endpoints/nodegroup/0/data@0' by 'producer'" in text
        assert "refused a write of 'endpoints/nodegroup/0/data@0' by 'nodegroup.1'" in text
        # Every replica wrote under its own key (NODE.R) and the policy refused none of the pipeline's own writes
        assert set(re.findall(r"refused a (?:write|delete) of '[^']*' by '([^']*)'", text)) == {"producer", "nodegroup.1"}
        for who in security.SPECIAL + ("producer", "aggregator", "nodegroup"):
            assert security.load_secret(str(keys), who)[1].decode() not in text
    finally:
        run.kill()


def electrons(out: Path):
    import h5py
    import numpy as np

    with h5py.File(out / "scan_1_electrons.h5") as f:
        frames = f["electron_events/frames"][()]
        return [np.asarray(x) for x in frames], f["electron_events/scan_positions"][()]


def open_and_secured(tmp_path) -> tuple[Path, Path]:
    """The README's main job (electron counting; a 32x32 scan to keep it short), open and with the registry and
    every data link under CURVE (keys made, one per replica)."""
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text().replace("scan_shape: [64, 64]", "scan_shape: [32, 32]")
    plain, secured = tmp_path / "plain.yaml", tmp_path / "secured.yaml"
    plain.write_text(text)
    secured.write_text(text + "\nsecurity: {keys: keys, registry: curve, data: curve}\n")
    r = subprocess.run([sys.executable, "-m", "zpipe", "keys", str(tmp_path / "keys"), "--topology", str(secured)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return plain, secured


def counted(tmp_path, path: Path, launch=()):
    """`[launch] zpipe run path` to its end: the scan exact, none of zpipe's own writes refused; its electrons."""
    out = tmp_path / f"out-{path.stem}"
    proc = subprocess.Popen([*launch, sys.executable, "-m", "zpipe", "run", str(path), "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, said[-3000:]
    # Every write zpipe itself makes is one its writer may make: nothing refused, nothing restored
    assert "refused" not in said and "restored" not in said, said[-3000:]
    report = json.loads((out / "scan_1_report.json").read_text())
    assert report["outcome"] == "complete" and report["received"] == report["expected"] == 4096, report
    return electrons(out)


def assert_same_electrons(a, b) -> None:
    import numpy as np

    (fa, pa), (fb, pb) = a, b
    assert np.array_equal(pa, pb) and len(fa) == len(fb) == 1024
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb)) and sum(len(x) for x in fa) > 0


@pytest.mark.slow  # the default run has the MPI one below: secured electrons == open ones, counted in full
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_same_results_with_security_on(tmp_path):
    """Open and secured: the same electrons at the same positions."""
    plain, secured = open_and_secured(tmp_path)
    assert_same_electrons(counted(tmp_path, plain), counted(tmp_path, secured))


@pytest.mark.mpi
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_a_secured_mpi_run_counts_the_same_electrons(tmp_path):
    """The node groups as MPI ranks (`mpiexec -n 2 zpipe run`, as in the paper) with the registry and every
    data link under CURVE and a key per replica: the same electrons as an open run without MPI, nothing refused."""
    plain, secured = open_and_secured(tmp_path)
    mpi = counted(tmp_path, secured, launch=(str(Path(sys.executable).with_name("mpiexec")), "-n", "2"))
    assert list((tmp_path / "out-secured").glob("*-mpi2.yaml")), "the secured run did not run under MPI"
    assert_same_electrons(counted(tmp_path, plain), mpi)
