"""What each role needs from the topology (its plugin kind and sockets), and where its code lives.

Validation reads these specs without importing the roles' code, so `zpipe validate` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class RoleSpec:
    name: str
    summary: str
    plugin_kind: str | None  # None: the role takes no plugin
    inputs: frozenset[str]  # patterns allowed as inputs
    outputs: frozenset[str]  # patterns allowed as outputs
    min_inputs: int = 0
    min_outputs: int = 0
    entry: str = ""  # module:function(NodeRuntime) -> dict
    requires: frozenset[str] = frozenset()  # NodeSpec fields that must be set
    analyses: bool = False  # runs the node's `analyses` list (plugins of kind "analysis")
    per_thread_inputs: bool = False  # each thread binds its own input socket, registered as name@thread
    leaves: bool = False  # answers a first SIGTERM by leaving gracefully (finish, hand back, deregister)
    # ... within this many seconds; then it stops (what is still under way is accounted as cut short).
    # A backstop above the role's own bounds, below the runner's grace before SIGKILL (zpipe.runner).
    leave_within: float = 22.0

    def load(self):
        module, _, attr = self.entry.partition(":")
        return getattr(import_module(module), attr)


ROLES: dict[str, RoleSpec] = {
    r.name: r
    for r in (
        RoleSpec(
            "source", "sends the messages of a source plugin, scan by scan, from `threads` threads",
            plugin_kind="source", inputs=frozenset(), outputs=frozenset({"push", "pub"}),
            min_outputs=1, entry="zpipe.roles.source:run",
        ),
        RoleSpec(
            "stage", "receives messages, hands them in batches to a stage plugin, sends what it returns",
            plugin_kind="stage", inputs=frozenset({"pull", "sub"}), outputs=frozenset({"push", "pub"}),
            min_inputs=1, entry="zpipe.roles.stage:run",
        ),
        RoleSpec(
            "producer", "sends a source's scans: expected counts first, then the data, routed by "
            "`route` straight to node groups or through an aggregator",
            plugin_kind="source", inputs=frozenset(), outputs=frozenset({"push"}),
            min_outputs=1, entry="zpipe.roles.producer:run", leaves=True, leave_within=10.0,
        ),
        RoleSpec(
            "aggregator", "one thread per producer replica: sums expected counts, then relays each "
            "message to node group `route` modulo the number of node groups",
            plugin_kind=None, inputs=frozenset({"pull"}), outputs=frozenset({"push"}),
            min_inputs=1, min_outputs=1, entry="zpipe.roles.aggregator:run",
            requires=frozenset({"route"}), per_thread_inputs=True, leaves=True,
        ),
        RoleSpec(
            "nodegroup", "receives parts on one socket per thread, assembles items, runs the "
            "analyses on batches, and accounts for every scan",
            plugin_kind=None, inputs=frozenset({"pull"}), outputs=frozenset(),
            min_inputs=1, entry="zpipe.roles.nodegroup:run",
            requires=frozenset({"assemble"}), analyses=True, per_thread_inputs=True, leaves=True,
        ),
    )
}
