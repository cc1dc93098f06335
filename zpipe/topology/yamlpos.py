"""Parse YAML into plain Python values plus a map from each path to its line and column.

We compose the node tree ourselves rather than loading it so that duplicate keys become
one more reported problem instead of stopping the parse, and so that every value keeps
its position for error messages.

Whatever the text, `parse` returns or raises YAMLSyntaxError, and in bounded time and
memory: nesting is capped (MAX_DEPTH), so are the values the file spells out
(MAX_SOURCE_VALUES: pure-Python YAML costs ~30 us a token) and the values aliases expand
to (MAX_VALUES: an alias bomb, "billion laughs", stops there); an alias inside itself is
an error, not an endless walk. Keys must be strings; YAML merge keys (`<<: *base`) work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer, MaxDepthExceededError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

Path = tuple[Any, ...]

MAX_DEPTH = 64  # levels of nesting, aliases included
MAX_SOURCE_VALUES = 20_000  # values written in the file (a real topology has a few hundred)
MAX_VALUES = 100_000  # values once aliases are expanded

_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"


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
    # Problems that do not stop the parse (a key that is not a string, a bad merge): path, here, message.
    problems: list[tuple[Path, tuple[int, int], str]] = field(default_factory=list)


class YAMLSyntaxError(Exception):
    def __init__(self, line: int, column: int, message: str):
        self.line, self.column, self.message = line, column, message
        super().__init__(f"{line}:{column}: {message}")


def line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character `index` of `text`."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _mark(node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


@dataclass(eq=False)
class _Alias:
    """An alias as written (`*name`): the node it names, and where the alias itself stands."""

    node: Any
    at: tuple[int, int]


class _Composer(Composer):
    """ruamel's composer, counting what it composes and keeping where each alias was used."""

    composed = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        self.composed += 1
        if self.composed > MAX_SOURCE_VALUES:
            m = event.start_mark
            raise YAMLSyntaxError(m.line + 1, m.column + 1,
                                  f"YAML: more than {MAX_SOURCE_VALUES:,} values; a topology is not that large")
        if isinstance(event, AliasEvent):
            m = event.start_mark
            return _Alias(super().compose_node(parent, index), (m.line + 1, m.column + 1))
        return super().compose_node(parent, index)


_KINDS = {bool: "the boolean", int: "the integer", float: "the number", bytes: "binary data"}


def _describe(value: Any) -> str:
    if value is None:
        return "null (an empty key)"
    text = repr(value) if not isinstance(value, bytes) else ""
    if len(text) > 40:
        text = text[:37] + "..."
    kind = next((k for t, k in _KINDS.items() if isinstance(value, t)), f"a {type(value).__name__}")
    return f"{kind} {text}".strip()


def _detail(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "integer string conversion" in text:  # CPython's guard against quadratic int parsing
        return "an integer of more than 4300 digits"
    return text


def parse(text: str) -> Parsed:
    yaml = YAML(typ="safe", pure=True)
    yaml.max_depth = MAX_DEPTH
    yaml.Composer = _Composer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. ruamel's ReusedAnchorWarning: a later anchor wins
            root = yaml.compose(text)
    except YAMLSyntaxError:
        raise
    except MaxDepthExceededError as exc:
        m = exc.problem_mark
        raise YAMLSyntaxError(m.line + 1 if m else 1, m.column + 1 if m else 1,
                              f"YAML: nested more than {MAX_DEPTH} levels deep") from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = " ".join(str(m) for m in (exc.context, exc.problem) if m) or str(exc).splitlines()[0]
        raise YAMLSyntaxError(line, col, f"YAML syntax: {message}") from None
    except ReaderError as exc:
        line, col = line_col(text, exc.position if isinstance(exc.position, int) else 0)
        what = (f"character U+{exc.character:04X}" if isinstance(exc.character, int)
                else f"byte {exc.character!r}")
        raise YAMLSyntaxError(line, col, f"YAML: {what} is not allowed in YAML text ({exc.reason})") from None
    except (YAMLError, RecursionError, MemoryError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, AssertionError) as exc:  # ruamel on input it did not expect
        raise YAMLSyntaxError(1, 1, f"YAML: cannot be read ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    positions = Positions()
    duplicates: list = []
    problems: list = []
    built = 0
    aliases: list[tuple[int, int]] = []  # positions of the aliases being expanded, outermost first
    active: set[int] = set()  # collection nodes being built: meeting one again is an alias inside itself

    def construct(node, what: str):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return yaml.constructor.construct_object(node, deep=True)
        except MarkedYAMLError as exc:
            raise YAMLSyntaxError(*_mark(node), f"YAML: {what}: {exc.problem or _detail(exc)}") from None
        except (YAMLError, ValueError, TypeError, OverflowError, RecursionError, AttributeError, KeyError) as exc:
            # e.g. an integer of more than 4300 digits, a malformed !!binary or !!timestamp
            raise YAMLSyntaxError(*_mark(node), f"YAML: {what}: {_detail(exc)}") from None

    def key_of(key_node, where: tuple[int, int], path: Path):
        """The key's string, or None (a problem recorded) if it is not one."""
        if isinstance(key_node, _Alias):
            key_node = key_node.node
        if not isinstance(key_node, ScalarNode):
            kind = "a list" if isinstance(key_node, SequenceNode) else "a mapping"
            problems.append((path, where, f"a key must be a string, not {kind}"))
            return None
        key = construct(key_node, "cannot read this key")
        if not isinstance(key, str):
            hint = "" if key is None else "; quote it if it is meant as one"
            problems.append((path, where, f"a key must be a string, not {_describe(key)}{hint}"))
            return None
        return key

    def build(node, path: Path):
        nonlocal built
        if isinstance(node, _Alias):
            aliases.append(node.at)
            try:
                return build(node.node, path)
            finally:
                aliases.pop()
        where = aliases[0] if aliases else _mark(node)  # an error inside an expansion: at the alias written
        built += 1
        if built > MAX_VALUES:
            raise YAMLSyntaxError(*where, f"YAML: aliases expand to more than {MAX_VALUES:,} values "
                                          f"(an alias bomb?)")
        if len(path) > MAX_DEPTH:
            raise YAMLSyntaxError(*where, f"YAML: nested more than {MAX_DEPTH} levels deep (through aliases)")
        positions.values[path] = _mark(node)
        if isinstance(node, ScalarNode):
            return construct(node, "cannot read this value")
        if id(node) in active:
            raise YAMLSyntaxError(*where, "YAML: recursive alias: a value that contains itself")
        if node.tag not in (_MAP, _SEQ):
            raise YAMLSyntaxError(*_mark(node), f"YAML: tag {node.tag!s} is not supported here")
        active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [build(item, (*path, i)) for i, item in enumerate(node.value)]
            return build_mapping(node, path)
        finally:
            active.discard(id(node))

    def build_mapping(node, path: Path) -> dict:
        merges: list = []
        entries: list = []
        for key_node, value_node in node.value:
            plain = key_node.node if isinstance(key_node, _Alias) else key_node
            here = key_node.at if isinstance(key_node, _Alias) else _mark(plain)
            if isinstance(plain, ScalarNode) and plain.tag == _MERGE:
                merges.append((here, value_node))
            else:
                entries.append((key_node, here, value_node))
        # YAML merge keys (`<<: *base` or `<<: [*a, *b]`): keys written here win, then the
        # first mapping listed (built last, so its positions stay); merged values keep the
        # positions where they were written.
        merged: dict = {}
        for here, value_node in merges:
            target = value_node.node if isinstance(value_node, _Alias) else value_node
            sources = list(target.value) if isinstance(target, SequenceNode) else [value_node]
            for src in reversed(sources):
                plain = src.node if isinstance(src, _Alias) else src
                if not isinstance(plain, MappingNode):
                    problems.append((path, here, "a merge key `<<` takes a mapping or a list of mappings"))
                    continue
                if id(plain) in active:
                    raise YAMLSyntaxError(*here, "YAML: recursive alias: a mapping that merges itself")
                merged.update(build(src, path))
        out: dict = {}
        for key_node, here, value_node in entries:
            key = key_of(key_node, here, path)
            if key is None:
                continue
            child = (*path, key)
            if key in out:
                duplicates.append((child, here, positions.keys[child]))
                continue
            positions.keys[child] = here
            out[key] = build(value_node, child)
        for k, v in merged.items():
            out.setdefault(k, v)
        positions.values[path] = _mark(node)
        return out

    try:
        data = build(root, ()) if root is not None else None
    except RecursionError:
        raise YAMLSyntaxError(1, 1, "YAML: nested too deeply") from None
    return Parsed(data, positions, duplicates, problems)
