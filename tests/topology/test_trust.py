"""What `zpipe validate` must catch so that what it accepts can start, and what it must survive.

Each check names where: FILE:LINE:COL: path: message.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from zpipe.topology.load import MAX_BYTES, check_file, check_text

ROOT = Path(__file__).resolve().parents[2]
LOCAL = (ROOT / "topologies" / "4dcamera-local.yaml").read_text()
DIRECT = (ROOT / "topologies" / "4dcamera-direct.yaml").read_text()
HELLO = (ROOT / "topologies" / "hello.yaml").read_text()


def problems(text: str, **kw) -> list[str]:
    topo, found = check_text(text, "t.yaml", **kw)
    assert (topo is None) == bool(found)
    return [str(p) for p in found]


def edit(text: str, *changes: tuple[str, str]) -> str:
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def test_the_shipped_topologies_pass():
    for text in (LOCAL, DIRECT, HELLO):
        assert problems(text) == []


# -- YAML that once gave a traceback or a hang --------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("name: t\x01\nnodes: {}\n", r"^t.yaml:1:8: YAML: character U\+0001 is not allowed"),
    ("name: t\nnodes:\n  a: &a [*a]\n", r"^t.yaml:3:10: YAML: recursive alias"),
    ("name: t\nnodes: &n {a: *n}\n", r"^t.yaml:2:15: YAML: recursive alias"),
    ("name: t\nnodes: &n\n  <<: *n\n", r"^t.yaml:3:3: YAML: recursive alias"),
    ("name: t\nnodes: " + "[" * 5000 + "]" * 5000 + "\n", r"^t.yaml:2:\d+: YAML: nested more than 64 levels deep"),
    ("name: t\nnodes:\n  a: {replicas: " + "9" * 5000 + "}\n",
     r"^t.yaml:3:17: YAML: cannot read this value: an integer of more than 4300 digits"),
    ("name: t\nnodes:\n  1: {role: source}\n", r"^t.yaml:3:3: nodes: a key must be a string, not the integer 1"),
    ("name: t\nnodes:\n  null: {role: source}\n", r"^t.yaml:3:3: nodes: a key must be a string, not null"),
    ("name: t\nnodes:\n  [a]: {role: source}\n", r"^t.yaml:3:3: nodes: a key must be a string, not a list"),
    ("name: t\nnodes:\n  a: !nope x\n", r"^t.yaml:3:6: YAML: cannot read this value: could not determine a constructor"),
    ("name: t\nnodes: !!set {a}\n", r"^t.yaml:2:8: YAML: tag tag:yaml.org,2002:set is not supported"),
    ("name: t\nnodes: [1," + "1," * 30000 + "]\n", r"^t.yaml:\d+:\d+: YAML: more than 20,000 values"),
])
def test_yaml_problems_are_positioned(text, expected):
    found = problems(text)
    assert any(re.search(expected, p) for p in found), found


def test_alias_bomb_stops_quickly_at_the_alias():
    lines = ["name: bomb", "a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    t0 = time.monotonic()
    found = problems("\n".join(lines) + "\nnodes: {}\n")
    assert time.monotonic() - t0 < 5
    assert any(re.match(r"t.yaml:\d+:\d+: YAML: aliases expand to more than 100,000 values", p) for p in found), found


def test_merge_keys_work_and_keys_written_win():
    text = edit(LOCAL, ("  aggregator:\n", "  aggregator: &agg\n"))
    text = text.replace("nodes:\n", "nodes:\n", 1)
    base, _ = check_text(LOCAL, "t.yaml")
    merged, found = check_text(edit(text, ("  nodegroup:\n    role: nodegroup\n", "  nodegroup:\n    <<: {role: stage}\n"
                                                                                   "    role: nodegroup\n")), "t.yaml")
    assert found == [] and merged.nodes == base.nodes


def test_merge_key_takes_mappings_only():
    found = problems("name: t\nnodes:\n  a:\n    <<: 1\n")
    assert any(re.match(r"t.yaml:4:5: nodes.a: a merge key `<<` takes a mapping", p) for p in found), found


def test_invalid_utf8_is_positioned(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_bytes(b"name: t\nnodes:\n  a: {role: caf\xe9}\n")
    _, found = check_file(f)
    assert [str(p) for p in found] == [f"{f}:3:16: not UTF-8 text: byte 0xe9 (invalid continuation byte)"]


def test_file_size_is_capped(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_bytes(b"name: t\nnodes: {}\n" + b"#" * MAX_BYTES)
    _, found = check_file(f)
    assert len(found) == 1 and "larger than 1,048,576 bytes" in str(found[0])


def test_a_directory_is_not_a_topology(tmp_path):
    _, found = check_file(tmp_path)
    assert [p.message for p in found] == ["cannot read topology: Is a directory"]


def test_control_characters_are_escaped_in_problems():
    found = problems(edit(HELLO, ("  sink:", '  "\\e[31msink\\u202e":')))
    assert found and all(c.isprintable() for p in found for c in p), found
    assert any("node name '\\x1b[31msink\\u202e' is not a name" in p for p in found), found


def test_integers_must_fit_in_64_bits():
    found = problems(edit(HELLO, ("messages: 1000", "messages: 99999999999999999999999")))
    assert any(re.match(r"t.yaml:11:17: nodes.source.params.messages: an integer of 23 digits does not fit", p)
               for p in found), found


# -- topologies that could not start ------------------------------------------------------------------

@pytest.mark.parametrize("base, changes, expected", [
    # names
    (HELLO, [("  sink:", "  'si.nk':")], r"t.yaml:\d+:3: nodes.'si.nk': node name 'si.nk' is not a name"),
    (HELLO, [("  sink:", "  " + "s" * 65 + ":")], r"node name 's+\.*' is longer than 64 characters"),
    (HELLO, [("      out: {pattern: push}", "      'o.ut': {pattern: push}")],
     r"t.yaml:14:7: nodes.source.sockets.'o.ut': name 'o.ut' is not a name"),
    # hosts and ports
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: '::1'}\nnodes:\n")],
     r"t.yaml:\d+:\d+: hosts.localhost.address: address '::1' is IPv6"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: '127.0.0.1:5555'}\nnodes:\n")],
     r"hosts.localhost.address: address '127.0.0.1:5555' is not a host name or an IPv4 address"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: 300.1.1.1}\nnodes:\n")], r"is not a valid IPv4 address"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: 127.0.0.1, bind: 'not valid!'}\nnodes:\n")],
     r"hosts.localhost.bind: bind 'not valid!' is not a host name"),
    (HELLO, [("nodes:\n", "registry: {address: 'localhost:5555'}\nnodes:\n")],
     r"registry.address: expected tcp://HOST:PORT"),
    # an address found when the host starts: `auto`, or an interface's
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {interface: 'eth 0'}\nnodes:\n")],
     r"t.yaml:\d+:26: hosts.localhost.interface: interface 'eth 0' is not an interface name"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {interface: ../../etc}\nnodes:\n")],
     r"t.yaml:\d+:26: hosts.localhost.interface: interface '../../etc' is not an interface name"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {interface: enp1s0f0np0-long}\nnodes:\n")],
     r"hosts.localhost.interface: interface 'enp1s0f0np0-long' is longer than 15 bytes"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {interface: 7}\nnodes:\n")],
     r"hosts.localhost.interface: Input should be a valid string"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: 10.0.0.1, interface: eth0}\nnodes:\n")],
     r"t.yaml:\d+:14: hosts.localhost: give the host's `address` or the `interface` it is found on, not both"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: auto, interface: eth0}\nnodes:\n")],
     r"hosts.localhost: give the host's `address` or the `interface` it is found on, not both"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {address: 'auto:eth0'}\nnodes:\n")],
     r"hosts.localhost.address: address 'auto:eth0' is not a host name or an IPv4 address"),
    (HELLO, [("nodes:\n", "hosts:\n  localhost: {adress: auto}\nnodes:\n")],
     r"hosts.localhost.adress: unknown key 'adress'; expected one of: address, interface, bind"),
    (HELLO, [("{pattern: push}", "{pattern: push, port: 80}")], r"nodes.source.sockets.out.port: port 80 is privileged"),
    (HELLO, [("nodes:\n", "registry: {port: 443}\nnodes:\n")], r"registry.port: port 443 is privileged"),
    (HELLO, [("nodes:\n", "registry: {port: 47001}\nhosts:\n  a: {address: 127.0.0.1}\n  b: {address: 127.0.0.1}\n"
                          "nodes:\n"), ("    role: source\n", "    role: source\n    host: b\n"),
             ("    role: stage\n", "    role: stage\n    host: a\n"), ("{pattern: push}", "{pattern: push, port: 47001}")],
     r"nodes.source.sockets.out.port: port 47001 on host 'b' is also claimed by registry"),
    (LOCAL, [("in: {pattern: pull}", "in: {pattern: pull, port: 47002}")],
     r"nodes.aggregator.sockets.in.port: a aggregator binds its input once per thread"),
    (HELLO, [("{pattern: push}", "{pattern: push, transport: ipc, port: 47003}")], r"`port` is only for tcp"),
    (HELLO, [("  source:", "  " + "s" * 60 + ":"), ("connect: source.out", "connect: " + "s" * 60 + ".out, transport: ipc"),
             ("{pattern: push}", "{pattern: push, transport: ipc}")],
     r"nodes.s+.sockets.out.transport: the ipc socket file 's+-0-out.sock' is too long for a unix socket path"),
    # the scan pipeline
    (LOCAL, [("    role: aggregator\n", "    role: aggregator\n    replicas: 2\n")],
     r"t.yaml:\d+:15: nodes.aggregator.replicas: an aggregator runs as one replica"),
    (LOCAL, [("data: {pattern: push, connect: aggregator.in}", "data: {pattern: push}")],
     r"nodes.producer.sockets.data: a producer's output must reach an aggregator or a nodegroup"),
    (LOCAL, [("out: {pattern: push, connect: nodegroup.data}", "out: {pattern: push}")],
     r"nodes.aggregator.sockets.out: an aggregator's output must reach a nodegroup"),
    (DIRECT, [("    route: frame_number\n", "")],
     r"t.yaml:7:3: nodes.producer: a producer that sends straight to a nodegroup needs `route`"),
    (LOCAL, [("    route: frame_number\n", "    route: module\n"), ("    replicas: 4 ", "    route: frame_number\n    replicas: 4 ")],
     r"nodes.producer.route: route 'frame_number' differs from the route of its aggregator 'aggregator' \('module'\)"),
    (LOCAL, [("    route: frame_number\n", "    route: module\n")],
     r"t.yaml:\d+:12: nodes.aggregator.route: route 'module' is not the item key of nodegroup 'nodegroup' "
     r"\(assemble.key 'frame_number'\)"),
    (DIRECT, [("    route: frame_number\n", "    route: frame_n5mber\n")],
     r"nodes.producer.route: route 'frame_n5mber' is not the item key of nodegroup 'nodegroup'"),
    (LOCAL, [("threads: 4             # 1:1 with aggregator threads", "threads: 3")],
     r"nodes.nodegroup.threads: a nodegroup needs one receiving thread per thread of the aggregator feeding it: 4, not 3"),
    (DIRECT, [("    threads: 4\n    workers", "    threads: 2\n    workers")],
     r"nodes.nodegroup.threads: a nodegroup fed straight by a producer needs one receiving thread per producer "
     r"replica: 4, not 2"),
    (DIRECT + "  nodegroup2:\n    role: nodegroup\n    threads: 4\n    assemble: {key: frame_number, part: module, "
              "parts: 4, shape: [144, 576]}\n    analyses: [{plugin: framesum}]\n    sockets:\n"
              "      data: {pattern: pull, connect: producer.data}\n", [],
     r"nodes.nodegroup2: a topology runs one scan pipeline, with one nodegroup node"),
    (DIRECT, [("  nodegroup:\n", "  sink:\n    role: stage\n    plugin: checksum\n    sockets: {in: {pattern: pull}}\n"
                                      "  nodegroup:\n"), ("connect: nodegroup.data}", "connect: sink.in}")],
     r"nodes.producer.sockets.data: a producer sends to an aggregator or a nodegroup, not to 'sink'"),
    (HELLO + "  ng:\n    role: nodegroup\n    assemble: {key: k, part: p, parts: 1, shape: [4]}\n"
             "    analyses: [{plugin: discard}]\n    sockets:\n      data: {pattern: pull}\n"
             "  feeder:\n    role: source\n    plugin: counter\n    sockets: {out: {pattern: push, connect: ng.data}}\n", [],
     r"nodes.ng.sockets.data: fed by 'feeder' \(role 'source'\); only a producer or a aggregator can feed a nodegroup"),
    (LOCAL, [("      out: {pattern: push, connect: nodegroup.data}\n",
              "      out: {pattern: push, connect: nodegroup.data}\n      out2: {pattern: push}\n")],
     r"nodes.aggregator.sockets.out2: role 'aggregator' uses one output socket only"),
    (HELLO, [("      in: {pattern: pull, connect: source.out}", "      in: {pattern: pull}")],
     r"nodes.source.sockets.out: nothing receives from this push socket"),
    # what a node group assembles
    (LOCAL, [("dtype: uint16", "dtype: 'no such'")], r"nodes.nodegroup.assemble.dtype: numpy does not know the dtype"),
    (LOCAL, [("dtype: uint16", "dtype: O")], r"nodes.nodegroup.assemble.dtype: dtype 'O' \(object\) is not a fixed-size"),
    (LOCAL, [("dtype: uint16", "dtype: 'i4,i4'")], r"is not a fixed-size number"),
    (LOCAL, [("shape: [144, 576]", "shape: [0, 576]")], r"assemble.shape: every dimension must be at least 1, not 0"),
    (LOCAL, [("shape: [144, 576]", "shape: []")], r"assemble.shape: a part needs at least one dimension"),
    (LOCAL, [("shape: [144, 576]", "shape: [100000, 100000]")], r"assemble.shape: an item \(4 parts of 100000x100000 "
                                                               r"uint16\) is 74.5 GiB; at most 256.0 MiB"),
    (LOCAL, [("batch: 16", "batch: 4096")], r"^$"),  # 4096 items of 648 KiB: 2.5 GiB, allowed
    (LOCAL, [("batch: 16", "batch: 4096"), ("shape: [144, 576]", "shape: [1440, 576]")],
     r"nodes.nodegroup.batch: a batch of 4096 items of 6.3 MiB is 25.3 GiB"),
    (LOCAL, [("parts: 4,", "parts: 65,")], r"assemble.parts: Input should be less than or equal to 64"),
    (LOCAL, [("part: module", "part: frame_number")], r"assemble.part: `key` and `part` are both 'frame_number'"),
    # numbers the runtime cannot wait on
    (LOCAL, [("scan_timeout: 10", "scan_timeout: .inf")], r"nodes.nodegroup.scan_timeout: Input should be a finite number"),
    (LOCAL, [("scan_timeout: 10", "scan_timeout: 1e9")], r"nodes.nodegroup.scan_timeout: Input should be less than or equal"),
    (HELLO, [("{pattern: push}", "{pattern: push, hwm: 99999999999}")], r"nodes.source.sockets.out.hwm: Input should be less"),
    (HELLO, [("nodes:\n", "status: {interval: 0.0001}\nnodes:\n")], r"status.interval: every 0.0001 s would flood"),
    (LOCAL, [("fallback: fallback ", "fallback: \"a\\0b\" ")], r"nodes.producer.fallback: a directory name cannot contain a NUL"),
    (LOCAL, [("route: frame_number", "route: ''")], r"nodes.aggregator.route: String should have at least 1 character"),
])
def test_what_would_not_start_is_reported(base, changes, expected):
    text = edit(base, *changes)
    found = problems(text)
    if expected == r"^$":  # the control: 4096 items of 648 KiB is 2.5 GiB, allowed
        assert found == [], found
        return
    assert any(re.search(expected, p) for p in found), found
    assert all(re.match(r"t.yaml:\d+:\d+: ", p) for p in found), found


def test_ipc_path_is_exact_when_the_output_directory_is_known(tmp_path):
    text = edit(HELLO, ("{pattern: push}", "{pattern: push, transport: ipc}"),
                ("connect: source.out", "connect: source.out, transport: ipc"))
    assert problems(text, output_dir=str(tmp_path)) == []
    deep = tmp_path / ("d" * 100)
    found = problems(text, output_dir=str(deep))
    assert any("too long for a unix socket path" in p and repr(str(deep)) in p for p in found), found


def test_validate_prints_no_traceback_for_odd_arguments(run_zpipe, tmp_path):
    weird = os.fsdecode(b"odd-\xff-name.yaml")
    (tmp_path / weird).write_text(HELLO)
    res = run_zpipe("validate", str(tmp_path / weird), str(tmp_path), str(tmp_path / "missing.yaml"))
    assert "Traceback" not in res.stdout + res.stderr
    assert res.returncode == 1
    assert "odd-\\udcff-name.yaml: ok" in res.stdout, res.stdout
    assert "Is a directory" in res.stderr and "missing.yaml:1:1: cannot read topology" in res.stderr


@pytest.mark.parametrize("host", ["{address: auto}", "{interface: eth0}", "{interface: ib0, bind: 0.0.0.0}",
                                  "{address: auto, bind: 0.0.0.0}"])
def test_a_host_whose_address_is_found_when_it_starts_is_accepted(host):
    text = edit(HELLO, ("nodes:\n", f"registry: {{host: a, port: 47010}}\nsecurity: none\nhosts:\n  a: {{address: 10.0.0.1}}\n"
                                    f"  b: {host}\nnodes:\n"),
                ("    role: source\n", "    role: source\n    host: a\n"), ("    role: stage\n", "    role: stage\n    host: b\n"))
    topo, found = check_text(text, "t.yaml")
    assert found == [] and topo.hosts["b"].dynamic and not topo.hosts["a"].dynamic


def test_hosts_found_when_they_start_are_machines_of_their_own_for_fixed_ports():
    """Two `auto` hosts cannot be told apart in advance: the same fixed port on each is no clash (it would be on
    two hosts of one fixed address)."""
    base = edit(HELLO, ("nodes:\n", "security: none\nhosts:\n  a: {address: auto}\n  b: {interface: eth0}\nnodes:\n"),
                ("    role: source\n", "    role: source\n    host: a\n"), ("    role: stage\n", "    role: stage\n    host: b\n"),
                ("{pattern: push}", "{pattern: push, port: 47011}"),
                ("connect: source.out}", "connect: source.out}\n      extra: {pattern: pull, port: 47011}"))
    assert not any("also claimed" in p for p in problems(base))
    same = base.replace("a: {address: auto}", "a: {address: 10.0.0.1}").replace("b: {interface: eth0}",
                                                                               "b: {address: 10.0.0.1}")
    assert any("port 47011 on host 'b' is also claimed" in p for p in problems(same))
