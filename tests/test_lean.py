"""A lean core (issue 10): a node process imports its own plugins only; listing and validation still see them all.

The node processes are real ones (`python -m zpipe.node`, against a real registry), run through a
tiny hook that writes the process's `sys.modules` when it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support import TOPOLOGIES, third_party, zpipe

from zpipe.kv import KVClient

# Runs `python -m zpipe.node ARGS` as is, and records what the process imported when it ends.
HOOK = """
import atexit, json, os, runpy, sys

def dump():
    catalog = sys.modules.get("zpipe.catalog")
    scanned = bool(catalog and catalog._entry_points.cache_info().currsize)
    with open(os.environ["LEAN_MODULES"], "w") as f:
        json.dump({"modules": sorted(sys.modules), "scanned_entry_points": scanned}, f)

atexit.register(dump)
sys.argv = ["zpipe.node", *sys.argv[1:]]
runpy.run_module("zpipe.node", run_name="__main__", alter_sys=True)
"""

HEAVY = ("numba", "h5py", "mpi4py")


def _imported_by_node(server, tmp_path, node: str, wait_for: str) -> dict:
    """Start replica 0 of `node` (4dcamera-local) against `server`, wait until `wait_for` keys appear, stop it."""
    kv = KVClient(server.address).start()
    try:
        kv.set("pipeline", {"id": "lean-test"})
        out = tmp_path / f"{node}-modules.json"
        env = {**os.environ, "LEAN_MODULES": str(out), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOOK, "--topology", str(TOPOLOGIES / "4dcamera-local.yaml"), "--node", node,
             "--replica", "0", "--host", "localhost", "--registry", server.address, "--output-dir", str(tmp_path)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            kv.wait(lambda items: bool(items), prefix=wait_for, timeout=40)
        except TimeoutError:
            proc.kill()
            pytest.fail(f"{node} never registered ({wait_for}); its output:\n{proc.communicate()[0]}")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                output = proc.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                output = proc.communicate()[0]
                pytest.fail(f"{node} did not stop on SIGTERM; its output:\n{output}")
        assert out.exists(), f"{node} ended without running its exit hook:\n{output}"
        return json.loads(out.read_text())
    finally:
        kv.close()


def test_aggregator_imports_no_plugin(server, tmp_path):
    seen = _imported_by_node(server, tmp_path, "aggregator", "endpoints/aggregator/0/")
    mods = set(seen["modules"])
    assert "zpipe.roles.aggregator" in mods  # the hook saw the node run
    assert not [m for m in mods if m.startswith("zpipe_4dcamera") or m == "zpipe.builtin"], sorted(mods)
    assert not [m for m in HEAVY if m in mods]
    assert not seen["scanned_entry_points"]  # not even the entry points were read


def test_producer_imports_its_source_only(server, tmp_path):
    seen = _imported_by_node(server, tmp_path, "producer", "nodes/producer/0")
    mods = set(seen["modules"])
    assert "zpipe_4dcamera.sources" in mods and "zpipe.roles.producer" in mods
    assert not [m for m in HEAVY if m in mods], "the producer imported another node's dependencies"
    assert not {"zpipe_4dcamera.electron", "zpipe_4dcamera.analyses", "zpipe_4dcamera.hdf5", "zpipe.builtin"} & mods


def test_node_group_imports_its_analyses_only(server, tmp_path):
    seen = _imported_by_node(server, tmp_path, "nodegroup", "endpoints/nodegroup/0/")
    mods = set(seen["modules"])
    assert {"zpipe_4dcamera.electron", "zpipe_4dcamera.analyses", "numba", "h5py"} <= mods  # its own: framesum, electron-count
    assert not {"zpipe_4dcamera.sources", "zpipe.builtin", "mpi4py"} & mods


# -- the catalog: lazy, yet everything is listed and every broken plugin named --------------------------------------

MARKER_CODE = """
import os
open(os.environ["LEAN_MARKER"], "a").write(__name__ + "\\n")
from zpipe.builtin import Relay as Noisy
"""


@pytest.fixture
def lean_dist(tmp_path):
    """A distribution with a plugin whose import leaves a mark, one that fails to import, and a stage of its own."""
    env = third_party(tmp_path / "site", "leanzp", "1.0",
                      {"noisy": "leanzp_noisy:Noisy", "lean-broken": "leanzp_missing:Nothing"},
                      {"leanzp_noisy": MARKER_CODE})
    env["LEAN_MARKER"] = str(tmp_path / "imported.txt")
    return env


def _topology(tmp_path, plugin: str) -> str:
    f = tmp_path / f"uses-{plugin}.yaml"
    f.write_text("name: t\nnodes:\n"
                 "  src:\n    role: source\n    plugin: counter\n    sockets:\n      out: {pattern: push}\n"
                 f"  st:\n    role: stage\n    plugin: {plugin}\n    sockets:\n"
                 "      in: {pattern: pull, connect: src.out}\n")
    return str(f)


def test_validation_imports_only_the_plugins_named(lean_dist, tmp_path):
    res = zpipe("validate", _topology(tmp_path, "relay"), env=lean_dist)
    assert res.returncode == 0, res.stderr  # a broken plugin nobody names is nobody's problem
    assert not (tmp_path / "imported.txt").exists()  # and the other plugins were not imported

    res = zpipe("validate", _topology(tmp_path, "noisy"), env=lean_dist)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "imported.txt").read_text().split() == ["leanzp_noisy"]


def test_validation_names_the_broken_plugin_and_its_distribution(lean_dist, tmp_path):
    res = zpipe("validate", _topology(tmp_path, "lean-broken"), env=lean_dist)
    assert res.returncode == 1
    assert ("nodes.st.plugin: plugin 'lean-broken' from leanzp 1.0 cannot be used: failed to import "
            "leanzp_missing:Nothing") in res.stderr
    assert not (tmp_path / "imported.txt").exists()


def test_listing_shows_every_plugin_and_the_broken_one_by_name(lean_dist, tmp_path):
    res = zpipe("plugins", "--json", env=lean_dist)
    assert res.returncode == 1  # something is broken, and says so
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert "failed to import leanzp_missing:Nothing" in rows["lean-broken"]["error"]
    assert rows["lean-broken"]["distribution"] == "leanzp 1.0"
    for name in ("noisy", "counter", "relay", "4dcamera-sim", "electron-count", "framesum"):
        assert rows[name]["error"] is None and rows[name]["kind"] in ("source", "stage", "analysis"), rows[name]


def test_get_imports_that_plugin_alone(lean_dist, tmp_path):
    code = ("import sys; from zpipe import catalog\n"
            "assert catalog.get('counter').kind == 'source'\n"
            "assert 'noisy' in catalog.names() and 'lean-broken' in catalog.names()\n"
            "heavy = [m for m in ('numba', 'h5py', 'zpipe_4dcamera', 'leanzp_noisy') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "try:\n    catalog.get('lean-broken')\nexcept LookupError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, **lean_dist})
    assert res.returncode == 0, res.stderr
    assert "plugin 'lean-broken' from leanzp 1.0 is broken: failed to import leanzp_missing:Nothing" in res.stdout
    assert not (tmp_path / "imported.txt").exists()


def test_a_name_two_distributions_claim_is_an_error_naming_both(tmp_path):
    env = third_party(tmp_path / "a", "dupa", "1.0", {"twice": "zpipe.builtin:Relay"})
    env2 = third_party(tmp_path / "b", "dupb", "2.0", {"twice": "zpipe.builtin:Discard"})
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "a"), env2["PYTHONPATH"]])
    res = zpipe("plugins", "--json", env=env)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert res.returncode == 1
    assert "name also registered by dupb 2.0" in rows["twice"]["error"]
    assert rows["relay"]["error"] is None


def test_core_dependencies_are_what_the_core_imports():
    """numba and h5py belong to the 4D-Camera plugins, mpi4py to the `mpi` extra: nothing in zpipe/ needs them."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    core = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in core["dependencies"]}
    assert not {"numba", "h5py", "mpi4py", "mpich"} & names
    assert {"mpi4py", "mpich"} <= {d.split(">")[0].strip().lower() for d in core["optional-dependencies"]["mpi"]}
    plugin = tomllib.loads((root / "plugins/4dcamera/pyproject.toml").read_text())["project"]
    assert {"numba", "h5py"} <= {d.split(">")[0].strip().lower() for d in plugin["dependencies"]}
    for py in (root / "zpipe").rglob("*.py"):
        text = py.read_text()
        for mod in ("numba", "h5py"):
            assert f"import {mod}" not in text and f"from {mod} " not in text, f"{py} imports {mod}"
