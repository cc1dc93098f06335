"""Finds plugins through the `zpipe.plugins` entry points, so built-in and third-party stages load one way.

A plugin that fails to import or is malformed is kept as an entry with its error, so it is
reported by name and distribution and never hides the plugins that do load.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from pydantic import BaseModel

from zpipe.plugin import KINDS, Plugin

GROUP = "zpipe.plugins"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    value: str  # module:attribute
    distribution: str
    cls: type[Plugin] | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        return self.cls.kind if self.cls else "?"

    @property
    def ok(self) -> bool:
        return self.cls is not None


def _check(obj) -> str | None:
    if not isinstance(obj, type) or not issubclass(obj, Plugin):
        return f"{obj!r} is not a subclass of zpipe.plugin.Source, Stage or Analysis"
    if obj.kind not in KINDS or not issubclass(obj, KINDS[obj.kind]):
        return f"{obj.__name__}.kind is {obj.kind!r}; expected one of {sorted(KINDS)} from its base class"
    if not (isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
        return f"{obj.__name__}.Params must be a pydantic model (subclass zpipe.plugin.Params)"
    try:
        obj.Params.model_json_schema()
    except Exception as exc:  # a Params model pydantic cannot describe is unusable in a topology
        return f"{obj.__name__}.Params is not a valid model: {exc}"
    return None


def _load(ep: EntryPoint) -> PluginInfo:
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
    try:
        obj = ep.load()
    except Exception as exc:
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return PluginInfo(ep.name, ep.value, dist, error=f"failed to import {ep.value}: {tb}")
    problem = _check(obj)
    if problem:
        return PluginInfo(ep.name, ep.value, dist, error=problem)
    return PluginInfo(ep.name, ep.value, dist, cls=obj)


@cache
def catalog() -> dict[str, PluginInfo]:
    """All plugins by entry-point name, loaded once per process."""
    found: dict[str, PluginInfo] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        info = _load(ep)
        if ep.name in found:  # two distributions claim one name: keep both visible as an error
            info = PluginInfo(ep.name, ep.value, info.distribution,
                              error=f"name also registered by {found[ep.name].distribution}")
        found.setdefault(ep.name, info)
    return found


def get(name: str) -> type[Plugin]:
    info = catalog().get(name)
    if info is None:
        raise LookupError(f"unknown plugin {name!r}; installed: {', '.join(installed()) or 'none'}")
    if info.cls is None:
        raise LookupError(f"plugin {name!r} from {info.distribution} is broken: {info.error}")
    return info.cls


def installed() -> list[str]:
    return [n for n, i in catalog().items() if i.ok]
