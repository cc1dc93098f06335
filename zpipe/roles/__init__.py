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
    )
}
