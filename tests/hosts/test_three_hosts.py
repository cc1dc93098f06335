"""Three hosts, each a network namespace of its own: receiving servers (the 4 producers), the aggregator with the
registry, and a compute node with two node groups. `zpipe run TOPOLOGY --host X` on each, no `--registry`: the
registry's address comes from the topology. A 64x64 scan of the simulated 4D Camera streams exactly and the
electron-counted HDF5 file is written on the compute host (issue 11, acceptance 1).

Also: the compute host as `address: auto` and as `interface: eth0` (found when it starts), and the two node
groups started by two runners of their own (`--node nodegroup --replica rank`, SLURM_PROCID 0 and 1).

Needs root and iproute2 (CI has both); skipped with the reason elsewhere. Every process is ended by pid and every
namespace deleted, whatever happens (tests/netns.py). The first test is in the default run; the others are
marked `netns` (`pytest -m netns tests/hosts`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from three_hosts import FRAMES, REGISTRY_PORT, Runs, make_net, topology


@pytest.fixture
def net(request):
    return make_net(request)


def streams_exactly(runs: Runs, agg_out: Path, writer_out: Path) -> dict:
    """Every runner ended with 0; the accountant's report says the scan is complete, every frame whole; the
    electron-counted file is on the compute host and h5py reads every frame of it."""
    codes = runs.wait()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{runs.logs()}"
    report = json.loads((agg_out / "scan_1_report.json").read_text())
    assert report["outcome"] == "complete" and report["ok"], (report.get("reasons"), runs.logs())
    assert report["expected"] == report["received"] == 4 * FRAMES
    items = report["items"]
    assert items["expected"] == items["processed"] == items["complete"] == FRAMES, items
    assert items["incomplete"] == 0 and not report["missing_parts"] and not report["missing_items"]
    h5 = writer_out / "scan_1_electrons.h5"
    assert h5.is_file(), f"no {h5}: {sorted(p.name for p in writer_out.iterdir())}"
    import h5py

    with h5py.File(h5, "r") as f:
        frames = f["electron_events/frames"]
        assert frames.shape[0] == FRAMES
        sp = f["electron_events/scan_positions"]
        assert (int(sp.attrs["Nx"]), int(sp.attrs["Ny"])) == (64, 64)
        assert sum(len(e) for e in frames[()]) > 0
    return report


def three_hosts(net, tmp_path, compute: str | None = None) -> tuple[Runs, Path, Path]:
    """The runners of the compute node and the receiving servers first (they wait for the registry, up to 30 s),
    then the registry's host. Not the other way round: today an aggregator takes a producer it has not seen
    within 3 s of starting for gone (zpipe.roster's grace), and ends its channel."""
    runs = Runs(net, tmp_path, topology(tmp_path, net, compute))
    comp = runs.start("compute", "compute")
    runs.start("recv", "recv")
    agg = runs.start("agg", "agg")
    return runs, agg, comp


@pytest.mark.timeout(240)
def test_a_scan_streams_exactly_across_three_hosts_with_no_registry_given(net, tmp_path):
    runs, agg, comp = three_hosts(net, tmp_path)
    report = streams_exactly(runs, agg, comp)
    # The compute host's runner reported the scan too, and from the same account.
    assert json.loads((comp / "scan_1_report.json").read_text())["received"] == report["received"]
    assert f"registry at tcp://{net.address['agg']}:{REGISTRY_PORT}" in (tmp_path / "compute.log").read_text()


@pytest.mark.netns
@pytest.mark.timeout(240)
@pytest.mark.parametrize("compute", ["{address: auto}", "{interface: eth0}"], ids=["auto", "interface"])
def test_the_compute_host_finds_its_address_when_it_starts(net, tmp_path, compute):
    runs, agg, comp = three_hosts(net, tmp_path, compute)
    streams_exactly(runs, agg, comp)
    # It published the address that reaches the registry: its own, on the namespace's link.
    assert f"on host compute ({net.address['compute']})" in (tmp_path / "compute.log").read_text()


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_node_groups_started_separately_take_their_replica_numbers_from_the_rank(net, tmp_path):
    runs = Runs(net, tmp_path, topology(tmp_path, net))
    outs = [runs.start(f"rank{r}", "compute", "--node", "nodegroup", "--replica", "rank",
                       env={"SLURM_PROCID": str(r)}) for r in (0, 1)]
    runs.start("recv", "recv")
    agg = runs.start("agg", "agg")
    streams_exactly(runs, agg, outs[0])  # the scan's first node group writes its file
    for r, out in enumerate(outs):
        log = (tmp_path / f"rank{r}.log").read_text()
        assert f"only nodegroup[{r}]" in log and f"[nodegroup[{1 - r}]]" not in log, log
        assert json.loads((out / "scan_1_report.json").read_text())["outcome"] == "complete"
        summary = [line for line in log.splitlines() if line.startswith("three-hosts: done")]
        assert summary and "nodegroup " in summary[0] and "producer" not in summary[0], log
