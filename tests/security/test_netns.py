"""Acceptance 1 of issue 12, across hosts: network namespaces (tests/netns.py) for the receiving servers (`recv`:
the 4 producers), the DAQ host (`daq`: registry, aggregator, node groups) and an `outsider` on the same network,
not in the topology. Security on: the registry and the node groups' data under CURVE, the aggregator's input
behind the address allow-list (the producers' host is in it, the outsider is not).

The outsider tries, with no key, with a key of its own, and with a stolen valid key (the producers'): to read
the registry, to write and delete keys, and to push data at the aggregator and a node group. Each attempt is
refused and counted (the registry's security/ keys, the nodes' `refused`), and the scan is exact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns
from support import TOPOLOGIES

PORT = 47761
PY = sys.executable

# Run in the daq namespace with the operator's key: what the registry holds (the test's eyes).
PROBE = r'''
import json, sys, time
from zpipe import security
from zpipe.kv import KVClient
registry, keys, what = sys.argv[1:4]
c = KVClient(registry, name="probe", curve=security.credentials(keys, "operator"), connect_timeout=30).start()
try:
    if what == "endpoints":
        want = ["endpoints/nodegroup/0/data@0", "endpoints/aggregator/0/in@0"]
        items = c.wait(lambda it: all(k in it for k in want), prefix="endpoints/", timeout=60)
        print(json.dumps({k: items[k]["address"] for k in want}))
    else:
        deadline = time.monotonic() + 30
        def seen():
            d = c.get("security/denied/producer") or {}
            r = c.get("security/denied/producer.2") or {}
            h = c.get("security/handshakes") or {}
            ng = c.get("status/nodegroup/0") or {}
            agg = c.get("status/aggregator/0") or {}
            return {"denied": d, "denied_replica": r, "handshakes": h, "ng_refused": ng.get("refused", 0),
                    "agg_refused": agg.get("refused", 0), "ng_endpoint": c.get("endpoints/nodegroup/0/data@0"),
                    "nodes_ng1": c.get("nodes/nodegroup/1") is not None,
                    "warnings": (ng.get("warnings") or []) + (agg.get("warnings") or [])}
        s = seen()
        while time.monotonic() < deadline and not (s["denied"].get("writes", 0) >= 2 and s["denied_replica"].get(
                "writes", 0) >= 2 and s["handshakes"].get(
                "rejected", 0) >= 2 and s["ng_refused"] >= 3 and s["agg_refused"] >= 2):
            time.sleep(0.2)
            s = seen()
        print(json.dumps(s))
finally:
    c.close()
'''

# Run in the outsider's namespace.
ATTACK = r'''
import json, sys, time
import zmq
from zpipe import security, wire
from zpipe.kv import KVClient, protocol as p
registry, stolen, ng, agg = sys.argv[1:5]
ctx = zmq.Context.instance()
out = {}
reg_pub = security.load_public(stolen, "registry")
ng_pub = security.load_public(stolen, "nodegroup")
stranger = zmq.curve_keypair()

def hello(curve=None):
    d = ctx.socket(zmq.DEALER); d.linger = 0
    if curve: d.curve_publickey, d.curve_secretkey = curve; d.curve_serverkey = reg_pub
    d.connect(registry); d.send_multipart([p.HELLO, b"1", b""])
    got = d.poll(2000); d.close(0)
    return bool(got)

out["hello_no_key"] = hello()
out["hello_own_key"] = hello(stranger)
try:
    KVClient(registry, name="stranger", connect_timeout=3,
             curve=security.Curve(stranger[0], stranger[1], reg_pub)).start()
    out["stranger_client"] = "connected"
except TimeoutError:
    out["stranger_client"] = "no answer"
# The stolen producer key: the registry lets it in, but not to write others' keys
c = KVClient(registry, name="thief", curve=security.credentials(stolen, "producer"), connect_timeout=30).start()
c.set("endpoints/nodegroup/0/data@0", {"node": "nodegroup", "replica": 0, "socket": "data@0",
                                       "address": "tcp://10.0.0.66:5555", "host": "outsider", "pid": 1}, ttl=5)
c.delete("nodes/nodegroup/1")
out["stolen_key_reads"] = len(c.items()) > 0
# The stolen key of producer replica 2: its own keys only, not replica 1's nor a node group's
r2 = KVClient(registry, name="thief-2", curve=security.credentials(stolen, "producer.2"), connect_timeout=30).start()
r2.set("status/producer/1", {"state": "forged"}, ttl=5)
r2.set("endpoints/nodegroup/0/data@0", {"node": "nodegroup", "replica": 0, "socket": "data@0",
                                        "address": "tcp://10.0.0.66:5555", "host": "outsider", "pid": 1}, ttl=5)

def push(address, curve=None, server=None):
    s = ctx.socket(zmq.PUSH); s.linger = 0
    if curve: s.curve_publickey, s.curve_secretkey = curve; s.curve_serverkey = server
    s.connect(address)
    n = 0
    for i in range(20):
        try:
            s.send_multipart([wire.pack_header({"kind": "data", "scan": 1, "frame_number": 1000 + i, "module": 0}),
                              b"\0" * 165888], zmq.NOBLOCK)
            n += 1
        except zmq.Again:
            pass
    return s, n

socks = [push(ng), push(ng, stranger, ng_pub), push(ng, security.load_secret(stolen, "producer"), ng_pub),
         push(agg), push(agg, stranger, ng_pub)]
out["queued"] = [n for _, n in socks]
time.sleep(4)  # reconnect attempts: each one refused and counted
for s, _ in socks:
    s.close(0)
c.close(withdraw=False)
r2.close(withdraw=False)
print(json.dumps(out))
'''


@pytest.fixture
def net(request):
    why = netns.available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    n = netns.Net(["daq", "recv", "outsider"])
    request.addfinalizer(n.close)
    return n


def topology(tmp_path: Path, net) -> Path:
    text = (TOPOLOGIES / "4dcamera-local.yaml").read_text()
    for old, new in (("\nnodes:\n", f"\nregistry: {{host: daq, port: {PORT}}}\nhosts:\n"
                                     f"  daq: {{address: {net.address['daq']}}}\n"
                                     f"  recv: {{address: {net.address['recv']}}}\n"
                                     "security: {keys: keys, registry: curve, data: curve, "
                                     "links: {aggregator.in: allow}}\n\nnodes:\n"),
                     ("scan_shape: [64, 64]", "scan_shape: [48, 48]"),
                     ("    fallback: fallback     # with no node group registered, write version-5 files here\n", ""),
                     ("    role: producer\n", "    role: producer\n    host: recv\n"),
                     ("    role: aggregator\n", "    role: aggregator\n    host: daq\n"),
                     ("    role: nodegroup\n", "    role: nodegroup\n    host: daq\n"),
                     ("- plugin: electron-count   # thresholds from the first 1200 complete frames, as at NCEM",
                      "- plugin: discard\n        params: {delay: 0.03}")):
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "secured-hosts.yaml"
    path.write_text(text)
    return path


@pytest.mark.timeout(400)
def test_outsider_host_and_stolen_key(tmp_path, net):
    topo = topology(tmp_path, net)
    r = subprocess.run([PY, "-m", "zpipe", "keys", str(tmp_path / "keys"), "--topology", str(topo)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # What the outsider holds: the public keys anyone may see, and the producers' stolen key pair.
    stolen = tmp_path / "stolen"
    stolen.mkdir(mode=0o700)
    for f in ("registry.key", "nodegroup.key", "producer.key", "producer.key_secret", "producer.2.key",
              "producer.2.key_secret"):
        shutil.copy2(tmp_path / "keys" / f, stolen / f)
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "attack.py").write_text(ATTACK)
    logs = {h: open(tmp_path / f"{h}.log", "w") for h in ("daq", "recv")}
    registry = f"tcp://{net.address['daq']}:{PORT}"
    runs = {}
    try:
        runs["daq"] = net.popen("daq", [PY, "-m", "zpipe", "run", str(topo), "--host", "daq", "--output-dir",
                                        str(tmp_path / "out")], stdout=logs["daq"], stderr=subprocess.STDOUT)
        time.sleep(1.0)
        runs["recv"] = net.popen("recv", [PY, "-m", "zpipe", "run", str(topo), "--host", "recv", "--output-dir",
                                          str(tmp_path / "out-recv")], stdout=logs["recv"], stderr=subprocess.STDOUT)
        res = net.run("daq", [PY, str(tmp_path / "probe.py"), registry, str(tmp_path / "keys"), "endpoints"],
                      capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stderr + (tmp_path / "daq.log").read_text()
        eps = json.loads(res.stdout)
        res = net.run("outsider", [PY, str(tmp_path / "attack.py"), registry, str(stolen),
                                   eps["endpoints/nodegroup/0/data@0"], eps["endpoints/aggregator/0/in@0"]],
                      capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        attack = json.loads(res.stdout)
        print("outsider:", attack)
        assert attack["hello_no_key"] is False and attack["hello_own_key"] is False
        assert attack["stranger_client"] == "no answer"
        res = net.run("daq", [PY, str(tmp_path / "probe.py"), registry, str(tmp_path / "keys"), "counts"],
                      capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stderr
        seen = json.loads(res.stdout)
        print("registry and nodes:", {k: v for k, v in seen.items() if k != "warnings"})
        assert seen["denied"]["writes"] >= 2, seen
        assert seen["denied_replica"]["writes"] >= 2, seen
        assert seen["denied_replica"]["last_key"] in ("status/producer/1", "endpoints/nodegroup/0/data@0"), seen
        assert seen["ng_endpoint"]["address"] == eps["endpoints/nodegroup/0/data@0"]  # untouched
        assert seen["nodes_ng1"]  # not deleted
        assert seen["handshakes"]["rejected"] >= 2, seen
        # The node group: no key (its socket's monitor), an unknown key and the producers' key (ZAP); the aggregator:
        # the outsider's address (ZAP) and a CURVE handshake at a NULL socket (its monitor)
        assert seen["ng_refused"] >= 3 and seen["agg_refused"] >= 2, seen
        outsider = net.address["outsider"]
        assert any(outsider in w for w in seen["warnings"]), seen["warnings"]
        for h in ("daq", "recv"):
            assert runs[h].wait(timeout=240) == 0, (tmp_path / f"{h}.log").read_text()[-3000:]
    finally:
        for f in logs.values():
            f.close()
    daq = (tmp_path / "daq.log").read_text()
    print(daq[-1500:])
    report = json.loads((tmp_path / "out" / "scan_1_report.json").read_text())
    assert report["outcome"] == "complete", report
    assert report["expected"] == report["received"] == report["sent"] == 48 * 48 * 4
    assert report["rejected"] == 0
    assert f"by 'producer'" in daq and "refused a delete of 'nodes/nodegroup/1'" in daq
    assert "refused a write of 'status/producer/1' by 'producer.2'" in daq
    # Every other write was its writer's: only the thieves' keys were refused
    assert set(re.findall(r"refused a (?:write|delete) of '[^']*' by '([^']*)'", daq)) == {"producer", "producer.2"}
