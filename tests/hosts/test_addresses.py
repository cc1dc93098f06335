"""Hosts without namespaces: addresses found when a host starts, the registry's address derived from the topology,
and which replicas a runner starts (--node, --replica, the launcher's rank). No root needed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from support import TOPOLOGIES, zpipe
from zpipe.hosts import AddressError, interface_address, registry_from_topology, resolve, route_source
from zpipe.runner import RunError, launcher_rank, parse_replicas, select
from zpipe.topology import HostSpec
from zpipe.topology.load import check_text

HELLO = (TOPOLOGIES / "hello.yaml").read_text()


def two_hosts(registry: str = "{host: a, port: 47020}", a: str = "{address: 127.0.0.1}",
              b: str = "{address: 127.0.0.1}", sink_replicas: int = 1):
    """hello.yaml with the source on host a (the registry's) and the sink on host b."""
    text = HELLO.replace("nodes:\n", f"registry: {registry}\nsecurity: none\nhosts:\n  a: {a}\n  b: {b}\nnodes:\n", 1)
    text = text.replace("    role: source\n", "    role: source\n    host: a\n", 1)
    text = text.replace("    role: stage\n", f"    role: stage\n    host: b\n    replicas: {sink_replicas}\n", 1)
    topo, problems = check_text(text, "t.yaml")
    assert not problems, problems
    return topo, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_interface_address_and_the_route_toward_the_registry():
    assert interface_address("lo") == "127.0.0.1"
    assert route_source("127.0.0.1") == "127.0.0.1"
    with pytest.raises(AddressError, match="no network interface named 'zpnosuch0' on this machine"):
        interface_address("zpnosuch0")


def test_resolving_a_host_when_it_starts():
    assert resolve(HostSpec(address="10.0.0.7"), "a", None) == "10.0.0.7"  # fixed: as given, nothing looked up
    assert resolve(HostSpec(address="auto"), "c", "tcp://127.0.0.1:5555") == "127.0.0.1"
    assert resolve(HostSpec(address="auto"), "c", "ipc:///tmp/reg") == "127.0.0.1"  # the registry is on this machine
    assert resolve(HostSpec(interface="lo"), "c", None) == "127.0.0.1"
    with pytest.raises(AddressError, match=r"host 'c' \(address: auto\): .* this host runs the registry itself; "
                                           r"give it a fixed `address` or an `interface`"):
        resolve(HostSpec(address="auto"), "c", None)
    with pytest.raises(AddressError, match=r"host 'c' \(interface: zpnosuch0\): no network interface named"):
        resolve(HostSpec(interface="zpnosuch0"), "c", None)


def test_the_registry_address_comes_from_the_topology_or_says_what_to_fix():
    topo, _ = two_hosts(a="{address: 10.0.0.5}")
    assert registry_from_topology(topo) == "tcp://10.0.0.5:47020"
    topo, _ = two_hosts(registry="{host: a}")
    with pytest.raises(AddressError, match=r"on any free port \(`registry.port` is 0\), which other hosts cannot "
                                           r"know: set `registry.port` in the topology"):
        registry_from_topology(topo)
    topo, _ = two_hosts(a="{address: auto}")
    with pytest.raises(AddressError, match=r"host 'a', whose address is known only when it starts \(address: auto\): "
                                           r"give that host a fixed `address`.* or give the registry's address with "
                                           r"--registry"):
        registry_from_topology(topo)


def test_which_replicas_a_runner_starts():
    topo, _ = two_hosts(sink_replicas=3)
    assert select(topo, "b") == {"sink": [0, 1, 2]}
    assert select(topo, "b", ["sink"], "0,2") == {"sink": [0, 2]}
    assert select(topo, "b", None, "1-2") == {"sink": [1, 2]}
    assert select(topo, "b", ["sink"], "rank", env={"SLURM_PROCID": "1"}) == {"sink": [1]}
    assert parse_replicas("rank", {"OMPI_COMM_WORLD_RANK": "2"}) == ([2], "OMPI_COMM_WORLD_RANK")
    assert launcher_rank({"PMI_RANK": "0", "SLURM_PROCID": "0"}) == (0, "SLURM_PROCID")
    for args, message in [
        ((["source"], None), r"--node 'source' is placed on host 'a', not on 'b'"),
        ((["nope"], None), r"--node 'nope' is not a node of the topology; its nodes: source, sink"),
        ((["sink"], "3"), r"--replica 3: node 'sink' has 3 replicas \(0-2\)"),
        ((["sink"], "1,x"), r"--replica '1,x': expected a replica number, a list such as 0,2"),
        ((["sink"], "2-1"), r"expected a replica number"),
        ((["sink"], "rank"), r"--replica rank takes the replica number from the launcher's rank, but none of "
                             r"SLURM_PROCID, PMI_RANK, PMIX_RANK, OMPI_COMM_WORLD_RANK is set"),
    ]:
        with pytest.raises(RunError, match=message):
            select(topo, "b", *args, env={})
    with pytest.raises(RunError, match=r"--replica 3 \(the launcher's rank, from PMIX_RANK\): node 'sink' has 3"):
        select(topo, "b", ["sink"], "rank", env={"PMIX_RANK": "3"})
    with pytest.raises(RunError, match=r"SLURM_PROCID='x' is not a rank"):
        launcher_rank({"SLURM_PROCID": "x"})


def test_run_says_in_one_line_what_to_fix(tmp_path):
    _, text = two_hosts(registry="{host: a}")
    f = tmp_path / "t.yaml"
    f.write_text(text)
    res = zpipe("run", str(f), "--host", "b", "--output-dir", str(tmp_path / "out"), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        "zpipe run: the registry runs on host 'a' on any free port (`registry.port` is 0)"), res.stderr
    res = zpipe("run", str(f), "--host", "b", "--replica", "rank", "--output-dir", str(tmp_path / "out"), timeout=60,
                env={v: "" for v in ("SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")})
    assert res.returncode == 2 and res.stderr.strip().startswith("zpipe run: --replica rank takes"), res.stderr


@pytest.mark.timeout(120)
def test_two_hosts_find_the_registry_from_the_topology(tmp_path):
    """Host b's runner, started first, finds the registry of host a at the address and port the topology gives."""
    port = free_port()
    _, text = two_hosts(registry=f"{{host: a, port: {port}}}")
    f = tmp_path / "t.yaml"
    f.write_text(text)
    procs = {}
    try:
        for host in ("b", "a"):
            procs[host] = subprocess.Popen([sys.executable, "-m", "zpipe", "run", str(f), "--host", host,
                                            "--output-dir", str(tmp_path / host)],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(0.5)
        outs = {h: p.communicate(timeout=90)[0] for h, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs["a"].returncode == procs["b"].returncode == 0, outs
    assert f"zpipe: hello on host b (127.0.0.1), registry at tcp://127.0.0.1:{port}" in outs["b"]
    assert "sink 1,000 msgs" in outs["b"] and "source 1,000 msgs" in outs["a"], outs


@pytest.mark.parametrize("a, b, required", [
    ("{address: 127.0.0.1}", "{address: 127.0.0.2}", False),  # one machine's loopback: open is fine
    ("{address: 10.0.0.5}", "{address: 10.0.0.6}", True),
    ("{address: 127.0.0.1}", "{address: auto}", True),  # found when it starts: another machine
    ("{address: 127.0.0.1}", "{interface: ib0}", True),
])
def test_a_topology_across_machines_must_say_security(a, b, required):
    _, text = two_hosts(a=a, b=b)
    bare = text.replace("security: none\n", "", 1)
    _, problems = check_text(bare, "t.yaml")
    if not required:
        assert not problems, problems
        return
    (p,) = problems
    assert p.path == "hosts" and "several machines (a, b)" in p.message and "security: none" in p.message, p
    assert (p.line, p.column) == (bare.splitlines().index("hosts:") + 1, 1)
    _, problems = check_text(text, "t.yaml")  # `security: none`: open, as written
    assert not problems, problems
