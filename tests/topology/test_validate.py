"""Validation reports every problem at once, each at its file, line and column."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zpipe.topology import TopologyError, load_topology
from zpipe.topology.load import check_text

HERE = Path(__file__).parent
GOOD = """\
name: t
nodes:
  source:
    role: source
    plugin: counter
    sockets:
      out: {pattern: push}
  sink:
    role: stage
    plugin: checksum
    sockets:
      in: {pattern: pull, connect: source.out}
"""


def problems(text: str) -> list[str]:
    topo, found = check_text(text, "t.yaml")
    assert (topo is None) == bool(found)
    return [str(p) for p in found]


def test_good_topology_loads():
    topo, found = check_text(GOOD, "t.yaml")
    assert found == []
    assert topo.nodes["sink"].sockets["in"].connect == "source.out"
    assert topo.nodes["source"].sockets["out"].binds


def test_five_independent_mistakes_each_reported_with_position(run_zpipe):
    res = run_zpipe("validate", str(HERE / "bad" / "five_mistakes.yaml"))
    assert res.returncode == 1
    lines = [l for l in res.stderr.splitlines() if re.match(r".*five_mistakes\.yaml:\d+:\d+: ", l)]
    where = [tuple(map(int, re.search(r"yaml:(\d+):(\d+):", l).groups())) for l in lines]
    assert where == [(7, 17), (14, 5), (16, 36), (19, 13), (21, 33)], res.stderr
    text = "\n".join(lines)
    assert "nodes.source.params.messages: Input should be a valid integer" in text
    assert "nodes.sink.colour: unknown key 'colour'" in text
    assert "nodes.sink.sockets.in.connect: node 'source' has no socket 'output'" in text
    assert re.search(r"nodes.other.plugin: unknown plugin .no-such-plugin.; installed: .*checksum \(stage\)", text)
    assert "port 7000 on host 'localhost' is also claimed by nodes.source.sockets.out (line 9)" in text


def test_malformed_yaml_gives_position_not_traceback(run_zpipe, tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nnodes:\n  a: {role: [source\n  b: 1\n")
    res = run_zpipe("validate", str(f))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert re.search(r"broken\.yaml:4:\d+: YAML syntax", res.stderr), res.stderr


def test_run_refuses_invalid_topology(run_zpipe):
    res = run_zpipe("run", str(HERE / "bad" / "five_mistakes.yaml"))
    assert res.returncode == 1
    assert "not started: 5 problems" in res.stderr


@pytest.mark.parametrize("change, expected", [
    (("      in: {pattern: pull, connect: source.out}", "      in: {pattern: push, connect: source.out}"),
     r"t.yaml:12:\d+: nodes.sink.sockets.in.connect: incompatible sockets: push cannot talk to source.out"),
    (("    plugin: checksum", "    plugin: counter"),
     r"t.yaml:10:13: nodes.sink.plugin: plugin 'counter' is a source; role 'stage' runs a stage"),
    (("    role: stage", "    role: sinkhole"), r"t.yaml:9:11: nodes.sink.role: unknown role 'sinkhole'"),
    (("connect: source.out", "connect: nowhere.out"), r"t.yaml:12:\d+: .*unknown node 'nowhere'; nodes: sink, source"),
    (("connect: source.out", "connect: sourceout"), r"expected `node.socket`, got 'sourceout'"),
    (("  sink:\n", "  source:\n"), r"t.yaml:8:3: nodes.source: duplicate key 'source' \(first defined at line 3\)"),
    (("    role: source\n", "    role: source\n    replicas: 0\n"), r"t.yaml:5:15: nodes.source.replicas: Input should be greater"),
    (("    role: source\n", "    role: source\n    host: far\n"), r"t.yaml:5:11: nodes.source.host: unknown host 'far'; hosts: localhost"),
    (("      out: {pattern: push}", "      out: {pattern: push, bind: true, connect: sink.in}"),
     r"nodes.source.sockets.out: a socket either binds or connects"),
    (("name: t\n", "name: t\nhosts:\n  localhost: {address: 0.0.0.0}\n"), r"t.yaml:3:\d+: hosts.localhost: `address` is what peers"),
])
def test_each_kind_of_mistake(change, expected):
    text = GOOD.replace(*change)
    assert text != GOOD
    found = problems(text)
    assert any(re.search(expected, p) for p in found), found


def test_cycle_is_reported():
    text = GOOD + """\
  back:
    role: stage
    plugin: relay
    sockets:
      in: {pattern: pull}
      out: {pattern: push, connect: loop.in}
  loop:
    role: stage
    plugin: relay
    sockets:
      in: {pattern: pull}
      out: {pattern: push, connect: back.in}
"""
    found = problems(text)
    assert any("data cycle: back -> loop -> back" in p for p in found), found


def test_aggregator_threads_must_pair_with_producer_replicas():
    text = (Path(__file__).parents[2] / "topologies" / "4dcamera-local.yaml").read_text()
    text = text.replace("threads: 4             # 1:1 with producer replicas", "threads: 3")
    found = problems(text)
    assert any(re.search(r"t.yaml:\d+:14: nodes.aggregator.threads: an aggregator needs one thread per producer "
                         r"replica feeding it: 4, not 3", p) for p in found), found


def test_load_topology_raises_with_all_problems(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(GOOD.replace("plugin: checksum", "plugin: nope").replace("role: source", "role: source\n    threads: x"))
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert len(info.value.problems) == 2


def test_shipped_topologies_are_valid(run_zpipe):
    files = sorted(str(p) for p in (HERE.parent.parent / "topologies").glob("*.yaml"))
    assert files
    res = run_zpipe("validate", *files)
    assert res.returncode == 0, res.stderr
