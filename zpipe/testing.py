"""Test a plugin in-process, without sockets or processes: the same calls the roles make, in the same order.

    from zpipe.testing import run_source, run_stage
    msgs = run_source(CounterSource, {"messages": 10})
    result = run_stage(ChecksumSink, {}, msgs)
    assert result.finished[1]["messages"] == 10
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zpipe.plugin import Context, Message, Plugin, Scan, Source, Stage


def make(cls: type[Plugin], params: Mapping[str, Any] | None = None, ctx: Context | None = None) -> Plugin:
    """Validate `params` through the plugin's own model (as `zpipe validate` does) and set it up."""
    plugin = cls(cls.Params.model_validate(dict(params or {})))
    plugin.setup(ctx or Context(node="test"))
    return plugin


def run_source(cls: type[Source], params: Mapping[str, Any] | None = None, *, threads: int = 1,
               ctx: Context | None = None) -> list[Message]:
    """Every message of every scan, as the source role would send them (threads in order)."""
    plugin = make(cls, params, ctx)
    out: list[Message] = []
    for scan in plugin.scans():
        for t in range(threads):
            out.extend(plugin.messages(scan, t, threads))
    return out


@dataclass
class StageResult:
    outputs: list[Message] = field(default_factory=list)
    finished: dict[int, dict[str, Any] | None] = field(default_factory=dict)


def run_stage(cls: type[Stage], params: Mapping[str, Any] | None, messages: Iterable[Message], *,
              batch: int = 64, ctx: Context | None = None) -> StageResult:
    """Feed `messages` in batches, grouped by their header's `scan`; finish each scan at the end."""
    plugin = make(cls, params, ctx)
    result = StageResult()
    by_scan: dict[int, list[Message]] = {}
    for m in messages:
        by_scan.setdefault(int(m.header.get("scan", 0)), []).append(m)
    for scan_id, msgs in by_scan.items():
        scan = Scan(scan_id)
        plugin.begin(scan)
        for i in range(0, len(msgs), batch):
            result.outputs.extend(plugin.process(msgs[i:i + batch]) or ())
        result.finished[scan_id] = plugin.finish(scan)
    return result
