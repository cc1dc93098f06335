"""`zpipe sessions`: the sessions a registry knows of, from the replicas' liveness keys and their records.

Without Slurm: ZPIPE_SESSION names the session, as SLURM_JOB_ID does in a job (tests/slurm for the real one).
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from sessions import Site, service_topology
from support import zpipe
from test_sessions import free_port
from zpipe import sessions


class FakeKV:
    def __init__(self, items=None):
        self.data = dict(items or {})

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, key, value, ttl=None):
        self.data[key] = value

    def delete(self, key):
        self.data.pop(key, None)

    def items(self, prefix=""):
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}


def test_where_a_session_comes_from():
    assert sessions.current({}) is None
    s = sessions.current({"SLURM_JOB_ID": "812", "SLURM_JOB_NODELIST": "nid[001-002]"})
    assert s["id"] == "812" and s["job"] == "812" and s["nodelist"] == "nid[001-002]" and s["scheduler"] == "slurm"
    s = sessions.current({"ZPIPE_SESSION": "night shift/1", "SLURM_JOB_ID": "9"})
    assert s["id"] == "night_shift_1" and s["job"] == "9"  # never a `/` in a key's path
    assert sessions.fields(None) == {} and sessions.fields(s) == {"session": s}


def test_states_from_liveness_keys_and_records():
    a = {"id": "1", "job": "1", "nodelist": "c1", "hostname": "c1"}
    b = {"id": "2", "job": "2", "nodelist": "c2", "hostname": "c2"}
    kv = FakeKV()
    for r in (0, 1):
        sessions.record(kv, a, "nodegroup", r, state="joined", host="compute", pipe="p")
        sessions.record(kv, b, "nodegroup", r, state="joined", host="compute", pipe="p")
    sessions.record(kv, a, "nodegroup", 0, state="left", host="compute", pipe="p")
    sessions.record(kv, a, "nodegroup", 1, state="leaving", host="compute", pipe="p")  # then killed: no `left`
    kv.set("nodes/nodegroup/0", {"node": "nodegroup", "replica": 0, "role": "nodegroup", "session": b,
                                 "started": time.time()})
    kv.set("nodes/nodegroup/1", {"node": "nodegroup", "replica": 1, "role": "nodegroup", "session": b,
                                 "leaving": True, "started": time.time()})
    kv.set("nodes/nodegroup/2", {"node": "nodegroup", "replica": 2, "role": "nodegroup"})
    rows, outside = sessions.summarize(kv.items())
    by = {e["id"]: e for e in rows}
    assert by["1"]["state"] == "lost" and by["1"]["replicas"] == {"nodegroup[0]": "left", "nodegroup[1]": "gone"}
    assert by["1"]["ended"] is not None
    assert by["2"]["state"] == "leaving" and by["2"]["replicas"] == {"nodegroup[0]": "alive",
                                                                    "nodegroup[1]": "leaving"}
    assert by["2"]["ended"] is None and outside == ["nodegroup[2]"]
    text = sessions.table(rows, outside)
    assert "nodegroup[0] left, nodegroup[1] gone" in text and "outside any session: nodegroup[2]" in text


def test_records_are_bounded():
    kv = FakeKV()
    for i in range(sessions.KEEP + 5):
        sessions.record(kv, {"id": f"s{i}"}, "nodegroup", 0, state="joined")
        sessions.record(kv, {"id": f"s{i}"}, "nodegroup", 1, state="joined")
    for r in (0, 1):
        ids = {k.split("/")[3] for k in kv.items(f"{sessions.PREFIX}nodegroup/{r}/")}
        assert len(ids) == sessions.KEEP and f"s{sessions.KEEP + 4}" in ids and "s0" not in ids


def listed(registry: str) -> dict:
    res = zpipe("sessions", "--registry", registry, "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow  # ~30 s: the default run stays near 10 min; the Slurm tests list sessions in .ci/run
@pytest.mark.timeout(240)
def test_a_session_is_listed_while_it_runs_and_after_it_ended(tmp_path, monkeypatch):
    port = free_port()
    topo = service_topology(tmp_path / "services.yaml", port=port, hosts={"servers": "127.0.0.1",
                                                                        "compute": "127.0.0.1"})
    site = Site(topo, tmp_path, f"tcp://127.0.0.1:{port}")
    try:
        site.start("servers", "servers")
        site.wait_alive("aggregator", 1)
        assert listed(site.registry)["sessions"] == []

        monkeypatch.setenv("ZPIPE_SESSION", "test-1")
        site.start("session", "compute", "--registry", site.registry)
        monkeypatch.delenv("ZPIPE_SESSION")
        site.wait_alive("nodegroup", 2)
        (s,) = listed(site.registry)["sessions"]
        assert s["id"] == "test-1" and s["state"] == "running" and s["ended"] is None, s
        assert s["replicas"] == {"nodegroup[0]": "alive", "nodegroup[1]": "alive"}, s

        scan, line, rc = site.acquire("--shape", "8x8")
        assert rc == 0 and "complete" in line, line

        took = site.stop("session")
        assert site.procs["session"].returncode in (0, 130), site.log("session")  # 130: ended by a signal
        data = listed(site.registry)
        (s,) = data["sessions"]
        assert s["state"] == "ended" and s["replicas"] == {"nodegroup[0]": "left", "nodegroup[1]": "left"}, s
        assert s["started"] <= s["ended"] and data["outside"] == []
        res = zpipe("sessions", "--registry", site.registry)
        assert res.returncode == 0 and "test-1" in res.stdout and "nodegroup[0] left, nodegroup[1] left" in res.stdout
        print(f"session test-1 left in {took:.1f} s; `zpipe sessions`:\n{res.stdout}")
    finally:
        assert not site.close()


def test_a_registry_that_does_not_answer():
    res = zpipe("sessions", "--registry", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "1")
    assert res.returncode == 2 and "does not answer" in res.stderr


def test_a_secured_registry_lets_each_replica_write_only_its_own_session_records(tmp_path):
    from zpipe import security
    from zpipe.topology.load import load_topology

    topo = load_topology(str(service_topology(tmp_path / "s.yaml", port=5599, hosts={"servers": "127.0.0.1",
                                                                                   "compute": "127.0.0.1"})),
                         plugins_of=())
    policy = security.Policy.for_topology(topo)
    assert policy.allows("nodegroup", "sessions/nodegroup/1/812")
    assert not policy.allows("nodegroup", "sessions/producer/0/812")
    assert not policy.allows(security.OPERATOR, "sessions/nodegroup/1/812")
