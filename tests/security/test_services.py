"""Secured services (issue 12 with issue 11's sessions): producers and the aggregator as services, a session of
node groups that joins through the registry with the `runner` key and a key per replica, acquisitions requested
with the `operator` key, the registry and every data link under CURVE. Two "hosts" on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import psutil
import pytest

from sessions import Site, service_topology

SECURED = "{keys: keys, registry: curve, data: curve}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 25 s; the default run has sessions (tests/test_sessions.py) and a secured pipeline
@pytest.mark.timeout(300)
def test_secured_services_serve_a_session_and_refuse_an_operator_without_the_key(tmp_path):
    port = free_port()
    topo = service_topology(tmp_path / "services.yaml", port=port,
                            hosts={"servers": "127.0.0.1", "compute": "127.0.0.1"}, security=SECURED)
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "zpipe", "keys", str(keys), "--topology", str(topo)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    site = Site(topo, tmp_path, f"tcp://127.0.0.1:{port}", keys=keys)
    try:
        site.start("servers", "servers")
        site.wait_alive("producer", 4)
        site.wait_alive("aggregator", 1)
        scan, line, rc = site.acquire("--shape", "16x16")  # no session yet: to disk
        assert rc == 0 and scan == 1 and "written to disk" in line, line

        # Without the operator's key: no answer from the registry, said in a line, in bounded time
        t0 = time.monotonic()
        blind = subprocess.run([sys.executable, "-m", "zpipe", "acquire", "--registry", site.registry, "--shape",
                                "16x16", "--wait"], capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert blind.returncode == 1 and "does not answer" in blind.stderr, blind.stderr
        assert "Traceback" not in blind.stderr and took < 60, (took, blind.stderr)

        # A session joins with the `runner` key; its node groups write with their own replica keys
        site.start("session", "compute", "--registry", site.registry)
        site.wait_alive("nodegroup", 2)
        scan, line, rc = site.acquire("--shape", "16x16")
        assert rc == 0 and scan == 2 and "scan 2 complete" in line, line
        r = site.report(2)
        assert r["expected"] == r["received"] == 1024 and r["complete"] == 256 and r["ok"], r
        for name in ("servers", "session"):  # every write the pipeline made was its writer's to make
            assert "refused" not in site.log(name), site.log(name)[-3000:]
        print(f"secured services: scan 1 to disk, scan 2 streamed {r['received']:,}/{r['expected']:,}; "
              f"an acquire without the key: exit {blind.returncode} in {took:.1f} s")
    finally:
        pids = [p.pid for p in site.procs.values()]
        killed = site.close()
        left = [p for p in psutil.process_iter(["pid", "cmdline"]) if str(topo) in " ".join(p.info["cmdline"] or [])]
        assert not killed and not left, (killed, [p.info for p in left], pids)
