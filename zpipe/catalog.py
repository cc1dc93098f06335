"""Finds plugins through the `zpipe.plugins` entry points, so built-in and third-party stages load one way.

Entry points are resolved by name and imported lazily: `get(name)` and `info(name)` import that
one plugin only, so a node process holds its own plugins and never another node's (numba, h5py
...). Reading the entry points themselves imports nothing. `catalog()` imports them all, for
`zpipe plugins` and for the list of what is installed when a topology names an unknown plugin.

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


def _distribution(ep: EntryPoint) -> str:
    return f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"


def _load(ep: EntryPoint) -> PluginInfo:
    dist = _distribution(ep)
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
def _entry_points() -> dict[str, list[EntryPoint]]:
    """Every `zpipe.plugins` entry point by name, in distribution order; reads metadata, imports nothing."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def names() -> list[str]:
    """Every registered plugin name, broken ones included, without importing any plugin."""
    return sorted(_entry_points())


@cache
def info(name: str) -> PluginInfo | None:
    """The plugin registered as `name`, importing that entry point only (once per process); None if unknown."""
    eps = _entry_points().get(name)
    if not eps:
        return None
    first = _load(eps[0])
    if len(eps) > 1:  # two distributions claim one name: keep both visible as an error, import neither further
        others = ", ".join(_distribution(ep) for ep in eps[1:])
        return PluginInfo(name, first.value, first.distribution, error=f"name also registered by {others}")
    return first


def catalog() -> dict[str, PluginInfo]:
    """All plugins by entry-point name, each imported (once per process): for listing them all."""
    return {name: info(name) for name in names()}


def get(name: str) -> type[Plugin]:
    """The plugin class registered as `name`; imports that plugin alone."""
    found = info(name)
    if found is None:
        raise LookupError(f"unknown plugin {name!r}; installed: {', '.join(names()) or 'none'}")
    if found.cls is None:
        raise LookupError(f"plugin {name!r} from {found.distribution} is broken: {found.error}")
    return found.cls


def installed() -> list[str]:
    """Names of the plugins that load (imports every plugin)."""
    return [n for n, i in catalog().items() if i.ok]
