"""Parse YAML into plain Python values plus a map from each path to its line and column.

We compose the node tree ourselves rather than loading it so that duplicate keys become
one more reported problem instead of stopping the parse, and so that every value keeps
its position for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

Path = tuple[Any, ...]


@dataclass
class Positions:
    """1-based (line, column) of every key and value, by path."""

    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def of(self, path: Path) -> tuple[int, int]:
        """Position of the value at `path`, or of its nearest known ancestor."""
        path = tuple(path)
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), (1, 1))

    def of_key(self, path: Path) -> tuple[int, int]:
        """Position of the key naming `path` (where an unknown key should point)."""
        return self.keys.get(tuple(path)) or self.of(path)


@dataclass
class Parsed:
    data: Any
    positions: Positions
    duplicates: list[tuple[Path, tuple[int, int], tuple[int, int]]]  # path, here, first


class YAMLSyntaxError(Exception):
    def __init__(self, line: int, column: int, message: str):
        self.line, self.column, self.message = line, column, message
        super().__init__(f"{line}:{column}: {message}")


def _mark(node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def parse(text: str) -> Parsed:
    yaml = YAML(typ="safe", pure=True)
    try:
        root = yaml.compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = " ".join(str(m) for m in (exc.context, exc.problem) if m) or str(exc)
        raise YAMLSyntaxError(line, col, f"YAML syntax: {message}") from None
    positions = Positions()
    duplicates: list = []

    def build(node, path: Path):
        positions.values[path] = _mark(node)
        if isinstance(node, MappingNode):
            out: dict = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode):
                    raise YAMLSyntaxError(*_mark(key_node), "YAML: keys must be plain scalars")
                key = yaml.constructor.construct_object(key_node, deep=True)
                child = (*path, key)
                if key in out:
                    duplicates.append((child, _mark(key_node), positions.keys[child]))
                    continue
                positions.keys[child] = _mark(key_node)
                out[key] = build(value_node, child)
            return out
        if isinstance(node, SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return yaml.constructor.construct_object(node, deep=True)
        except MarkedYAMLError as exc:
            raise YAMLSyntaxError(*_mark(node), f"YAML: {exc.problem or exc}") from None

    data = build(root, ()) if root is not None else None
    return Parsed(data, positions, duplicates)
