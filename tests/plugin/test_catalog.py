"""Plugins come from entry points; a broken one is named with its distribution and hides nothing."""

from __future__ import annotations

import json

import pytest

from support import third_party

from zpipe import catalog


def test_builtin_plugins_register_through_entry_points():
    found = catalog.catalog()
    assert {"counter", "checksum", "relay"} <= set(found)
    assert found["counter"].kind == "source" and found["checksum"].kind == "stage"
    assert found["counter"].distribution.startswith("zpipe ")


@pytest.fixture
def broken_dist(tmp_path):
    """A third-party distribution with one plugin that fails to import and one that is not a plugin."""
    return third_party(tmp_path, "brokenzp", "0.3",
                       {"ghost": "brokenzp_missing_module:Ghost", "notaplugin": "json:dumps"})


def test_broken_plugins_are_reported_and_others_still_listed(run_zpipe, broken_dist):
    res = run_zpipe("plugins", "--json", env=broken_dist)
    assert res.returncode == 1  # something is broken, and says so
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["ghost"]["distribution"] == "brokenzp 0.3"
    assert "failed to import brokenzp_missing_module:Ghost" in rows["ghost"]["error"]
    assert "not a subclass of zpipe.plugin" in rows["notaplugin"]["error"]
    assert rows["counter"]["error"] is None and rows["counter"]["kind"] == "source"
    assert rows["counter"]["params"]["messages"]["type"] == "int"


def test_plain_listing_names_kind_distribution_and_params(run_zpipe, broken_dist):
    res = run_zpipe("plugins", env=broken_dist)
    assert "ghost" in res.stdout and "BROKEN: failed to import" in res.stdout
    assert any(l.split()[:3] == ["counter", "source", "zpipe"] for l in res.stdout.splitlines())
    assert "messages: int (default 1000)" in res.stdout


def test_topology_naming_a_broken_plugin_says_which_distribution(run_zpipe, broken_dist, tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("name: t\nnodes:\n  s:\n    role: source\n    plugin: ghost\n    sockets:\n      out: {pattern: push}\n")
    res = run_zpipe("validate", str(f), env=broken_dist)
    assert res.returncode == 1
    assert "t.yaml:5:13: nodes.s.plugin: plugin 'ghost' from brokenzp 0.3 cannot be used" in res.stderr


def test_get_unknown_lists_installed():
    with pytest.raises(LookupError, match="unknown plugin 'nope'; installed: .*counter"):
        catalog.get("nope")
