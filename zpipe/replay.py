"""`zpipe replay`: stream disk-fallback files through a pipeline later, as if the scan were live.

Every producer of the topology gets the replay plugin its source names (`Source.replay_plugin`)
reading the given directory; the rest of the graph is unchanged, so the result is the one the
live stream would have given. A replay plugin may check the directory first (a static
`check_replay(directory, scans)` that raises ValueError or OSError): nothing to replay is an
error before anything starts.
"""

from __future__ import annotations

import os

from ruamel.yaml import YAML

from zpipe import catalog
from zpipe.topology import Topology


class ReplayError(Exception):
    pass


def replay_topology(topology: Topology, directory: str, scans: list[int] | None) -> Topology:
    nodes = dict(topology.nodes)
    replaced = 0
    checked: set[str] = set()
    for name, node in topology.nodes.items():
        if node.role != "producer":
            continue
        cls = catalog.get(node.plugin)
        plugin = getattr(cls, "replay_plugin", None)
        if not plugin:
            raise ReplayError(f"producer {name!r} uses plugin {node.plugin!r}, which names no replay plugin "
                              f"(set `replay_plugin` on its class)")
        if plugin not in checked:
            check = getattr(catalog.get(plugin), "check_replay", None)
            if check is not None:
                try:
                    check(directory, scans)
                except (ValueError, OSError) as exc:
                    raise ReplayError(str(exc)) from None
            checked.add(plugin)
        params = {"directory": os.path.abspath(directory)}
        if scans:
            params["scans"] = scans
        nodes[name] = node.model_copy(update={"plugin": plugin, "params": params, "fallback": None})
        replaced += 1
    if not replaced:
        raise ReplayError(f"topology {topology.name!r} has no producer to replay through")
    return topology.model_copy(update={"nodes": nodes, "name": f"{topology.name}-replay"})


def write_topology(topology: Topology, path: str) -> str:
    """The node processes load the topology from a file, so the rewritten one is saved."""
    data = topology.model_dump(mode="json", exclude_defaults=True)
    data.setdefault("name", topology.name)
    data["nodes"] = {n: topology.nodes[n].model_dump(mode="json", exclude_defaults=True) | {"role": topology.nodes[n].role}
                     for n in topology.nodes}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    yaml = YAML()
    yaml.default_flow_style = False
    with open(path, "w") as f:
        f.write(f"# written by zpipe replay from {topology.name}; edit the original, not this\n")
        yaml.dump(data, f)
    return path
