"""`zpipe keys`: a certificate pair per identity, secrets 0600, loose secrets refused naming the file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import zmq.auth

from zpipe import security

TOPOLOGY = os.path.join(os.path.dirname(__file__), "..", "..", "topologies", "4dcamera-local.yaml")


def zpipe(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "zpipe", *args], capture_output=True, text=True, timeout=timeout)


def test_keys_for_a_topology_are_made_private_and_listed(tmp_path):
    d = tmp_path / "keys"
    r = zpipe("keys", str(d), "--topology", TOPOLOGY)
    assert r.returncode == 0, r.stderr
    names = {"registry", "runner", "operator", "producer", "aggregator", "nodegroup", "producer.0", "producer.3",
             "aggregator.0", "nodegroup.0", "nodegroup.1"}
    for n in names:
        assert stat.S_IMODE(os.stat(d / f"{n}.key_secret").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d / f"{n}.key").st_mode) == 0o644
        assert f"{n} " in r.stdout and "(created)" in r.stdout
        # pyzmq's own format: its loader reads them
        pub, sec = zmq.auth.load_certificate(str(d / f"{n}.key_secret"))
        assert pub == security.load_secret(str(d), n)[0] and sec is not None
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    # Run again: nothing replaced; listed
    before = (d / "registry.key").read_text()
    r = zpipe("keys", str(d), "--identity", "extra")
    assert r.returncode == 0 and (d / "registry.key").read_text() == before
    assert "extra" in r.stdout and "(kept)" not in r.stdout.split("extra")[0].splitlines()[-1]
    # The secret never appears in the listing
    secret = security.load_secret(str(d), "registry")[1].decode()
    assert secret not in r.stdout


def test_keys_for_a_secured_topology_whose_directory_is_not_made_yet(tmp_path):
    topo = tmp_path / "secured.yaml"
    with open(TOPOLOGY) as f:
        topo.write_text(f.read() + "\nsecurity: {keys: keys, registry: curve}\n")
    r = zpipe("keys", str(tmp_path / "keys"), "--topology", str(topo))
    assert r.returncode == 0, r.stderr
    made = {p.name for p in (tmp_path / "keys").iterdir()}
    for n in ("registry", "nodegroup", "nodegroup.1", "producer.3", "aggregator.0"):
        assert {f"{n}.key", f"{n}.key_secret"} <= made, n
    assert "producer.4.key" not in made and "nodegroup.2.key" not in made
    assert zpipe("validate", str(topo)).returncode == 0


def test_a_loose_secret_is_refused_naming_the_file(tmp_path):
    d = str(tmp_path / "keys")
    security.create(d, ["registry", "node"])
    path = os.path.join(d, "node.key_secret")
    for mode in (0o640, 0o604, 0o660, 0o644):
        os.chmod(path, mode)
        with pytest.raises(security.SecurityError) as e:
            security.load_secret(d, "node")
        msg = str(e.value)
        assert path in msg and f"{mode:04o}" in msg and "\n" not in msg
    r = zpipe("keys", d)
    assert r.returncode == 1 and "LOOSE (0644)" in r.stdout
    os.chmod(path, 0o600)
    assert security.load_secret(d, "node")[1]


def test_missing_or_malformed_keys_are_one_line_errors(tmp_path):
    d = str(tmp_path)
    with pytest.raises(security.SecurityError, match="cannot read"):
        security.load_secret(d, "nobody")
    p = tmp_path / "bad.key_secret"
    p.write_text("not a certificate")
    os.chmod(p, 0o600)
    with pytest.raises(security.SecurityError, match="not a CURVE certificate"):
        security.load_secret(d, "bad")


def test_policy_from_how_keys_are_written():
    from zpipe.topology.load import load_topology

    pol = security.Policy.for_topology(load_topology(TOPOLOGY, plugins_of=()))
    ok = {
        "nodegroup": ["endpoints/nodegroup/1/data@3", "nodes/nodegroup/0", "status/nodegroup/1",
                      "flow/nodegroup/0/7", "totals/nodegroup/0", "failures/nodegroup/1", "scans/7/part/1",
                      "scans/7/output/framesum", "preview/7/framesum.sum/1", "endpoints/nodegroup/0/results",
                      "sessions/nodegroup/1/job-42"],
        "producer": ["scans/7", "scans/7/fallback/producer/2/0", "flow/producer/3/end", "acquired/abc"],
        "aggregator": ["endpoints/aggregator/0/in@2", "flow/aggregator/0/7"],
        "runner": ["runners/local/1234"],
        "operator": ["acquire/abc"],
        "registry": ["pipeline", "scans/7/report", "anything"],
    }
    bad = {
        "nodegroup": ["endpoints/aggregator/0/in@2", "nodes/producer/0", "scans/7", "scans/7/report", "pipeline",
                      "status/nodegroupX/0", "acquire/x", "runners/h/1", "sessions/producer/0/job-42"],
        "producer": ["endpoints/nodegroup/0/data@0", "scans/7/part/0", "scans/7/report", "scans/7/fallback/other/0/0"],
        "aggregator": ["scans/7", "status/producer/0"],
        "runner": ["pipeline", "endpoints/nodegroup/0/data"],
        "operator": ["scans/1", "nodes/nodegroup/0"],
        "stranger": ["endpoints/nodegroup/0/data", "anything"],
    }
    for who, keys in ok.items():
        for k in keys:
            assert pol.allows(who, k), (who, k)
    for who, keys in bad.items():
        for k in keys:
            assert not pol.allows(who, k), (who, k)


def test_a_missing_or_loose_secret_stops_zpipe_run_in_one_line_naming_it(tmp_path):
    topo = tmp_path / "secured.yaml"
    with open(TOPOLOGY) as f:
        topo.write_text(f.read() + "\nsecurity: {keys: keys, registry: curve}\n")
    assert zpipe("keys", str(tmp_path / "keys"), "--topology", str(topo)).returncode == 0
    secret = tmp_path / "keys" / "nodegroup.1.key_secret"
    os.chmod(secret, 0o644)
    r = zpipe("validate", str(topo))
    assert r.returncode != 0 and str(secret) in r.stdout + r.stderr and "0644" in r.stdout + r.stderr, r
    r = zpipe("run", str(topo), "--output-dir", str(tmp_path / "out"), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{secret}: secret key file is accessible by group or others (mode 0644)" in r.stderr, r.stderr
    assert "not started: 1 problem" in r.stderr  # refused as the topology is checked, before anything starts
    os.remove(secret)  # gone: replica 1 does not fall back to the node's key (the registry would refuse it)
    r = zpipe("run", str(topo), "--output-dir", str(tmp_path / "out"), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"nodegroup[1] cannot start: {secret}: cannot read secret key file" in r.stderr, r.stderr


def test_a_secured_registry_cannot_be_an_external_one(tmp_path):
    security.create(str(tmp_path / "keys"), ["registry", "runner", "operator", "producer", "aggregator", "nodegroup"])
    topo = tmp_path / "external.yaml"
    with open(TOPOLOGY) as f:
        text = f.read()
    topo.write_text(text.replace("\nnodes:\n", "\nregistry: {address: 'tcp://127.0.0.1:5999'}\nnodes:\n", 1)
                    + "\nsecurity: {keys: keys, registry: curve}\n")
    r = zpipe("validate", str(topo))
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "security.registry" in said and "external" in said and "Traceback" not in said, said
    topo.write_text(topo.read_text().replace("registry: curve}", "registry: none}"))
    r = zpipe("validate", str(topo))
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_node_cannot_take_a_special_identity_name(tmp_path):
    security.create(str(tmp_path / "keys"), ["registry", "runner", "operator", "aggregator", "nodegroup"])
    topo = tmp_path / "t.yaml"
    with open(TOPOLOGY) as f:
        text = f.read()
    assert "\n  aggregator:\n" in text and "connect: aggregator." in text
    topo.write_text(text.replace("\n  aggregator:\n", "\n  registry:\n").replace("connect: aggregator.",
                                                                                "connect: registry.")
                    + "\nsecurity: {keys: keys, registry: curve}\n")
    r = zpipe("validate", str(topo))
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "node 'registry' has the name of one of security's own identities" in said, said
    open_topo = tmp_path / "open.yaml"  # without security: no keys, no clash
    open_topo.write_text(topo.read_text().replace("\nsecurity: {keys: keys, registry: curve}\n", ""))
    assert zpipe("validate", str(open_topo)).returncode == 0
    assert "Traceback" not in said
