"""A deterministic generator of malformed topologies, for `zpipe validate` (tests/topology/test_fuzz_validate.py).

Two kinds of case, each a name and the file's bytes:

* hand-written: the inputs that once gave a traceback or a hang (invalid UTF-8, control
  characters, merge keys, recursive aliases, deep nesting, huge integers, keys that are not
  strings, an alias bomb, an oversized file) and their relatives;
* mutations of the repository's real topologies (topologies/*.yaml, benchmarks/topologies/*.yaml),
  drawn from a seeded random.Random: keys deleted, duplicated, renamed or retyped; values
  swapped for wrong types, for huge, negative or zero numbers, junk or unicode strings, deep
  nesting; small plausible edits (replicas, threads, routes, links, hosts, ports, plugins,
  assemble) that may or may not leave a topology that can run; aliases and merge keys;
  random byte flips, insertions, truncations and line edits.

The same seed always gives the same cases, in the same order.
"""

from __future__ import annotations

import copy
import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("topologies/*.yaml"), *ROOT.glob("benchmarks/topologies/*.yaml")])
SEED = 20240909
MUTATIONS = 240


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    kind: str  # "hand" or the mutation operator's name

    def __repr__(self) -> str:
        return f"Case({self.id}, {len(self.data)} bytes)"


# -- hand-written ------------------------------------------------------------------------------------

HELLO = (ROOT / "topologies" / "hello.yaml").read_text()
GOOD_NODE = "    role: source\n    plugin: counter\n    sockets: {out: {pattern: pub}}\n"


def _bomb(levels: int = 12, width: int = 10) -> str:
    lines = ["name: bomb", "a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append("nodes: {}")
    return "\n".join(lines) + "\n"


def _nodes(*bodies: str) -> str:
    return "name: t\nnodes:\n" + "".join(bodies)


def hand_written() -> list[Case]:
    big_int = "9" * 5000
    out: dict[str, bytes | str] = {
        # encodings and characters
        "invalid-utf8": b"name: t\nnodes:\n  a: {role: \xff\xfe}\n",
        "invalid-utf8-in-comment": b"# caf\xe9\n" + HELLO.encode(),
        "truncated-utf8": HELLO.encode() + b"# \xe2\x82",
        "utf16-with-bom": HELLO.encode("utf-16"),
        "utf8-bom": b"\xef\xbb\xbf" + HELLO.encode(),
        "control-char": b"name: t\x01\nnodes: {}\n",
        "nul-byte": HELLO.encode().replace(b"hello", b"hel\x00lo", 1),
        "escape-sequence-in-name": HELLO.replace("name: hello", 'name: "\\e[31mred"'),
        "lone-surrogate-escape": HELLO.replace("plugin: checksum", 'plugin: "\\ud800"'),
        "bidi-override-node-name": HELLO.replace("  sink:", "  \u202esink:"),
        "zero-width-node-name": HELLO.replace("  sink:", "  si\u200bnk:"),
        "tab-indent": HELLO.replace("    role: stage", "\trole: stage"),
        # YAML features
        "merge-key": _nodes("  base: &b {role: source, plugin: counter}\n  a:\n    <<: *b\n    sockets: {out: {pattern: pub}}\n"),
        "merge-key-list": _nodes("  a: &a {role: source}\n  b: &b {plugin: counter}\n  c:\n    <<: [*a, *b]\n"
                                 "    sockets: {out: {pattern: pub}}\n"),
        "merge-key-scalar": _nodes("  a:\n    <<: 1\n" + GOOD_NODE),
        "merge-key-self": "name: t\nnodes: &n\n  <<: *n\n",
        "merge-key-undefined": _nodes("  a:\n    <<: *nope\n"),
        "recursive-alias": "name: t\nnodes:\n  a: &a [*a]\n",
        "recursive-alias-mapping": "name: t\nnodes: &n {a: *n}\n",
        "alias-bomb": _bomb(),
        "alias-bomb-in-params": HELLO.replace("      size: 16384", "      size: 16384\n      junk: " +
                                              _bomb(9, 9).split("\n", 1)[1].replace("\n", "\n      ").replace(
                                                  "nodes: {}", "")),
        "alias-as-key": "name: t\nk: &k sink\nnodes:\n  *k : {role: stage}\n",
        "undefined-alias": "name: t\nnodes: *x\n",
        "duplicate-anchor": "name: &a t\ndescription: &a d\nnodes: {}\n",
        "custom-tag": HELLO.replace("plugin: counter", "plugin: !python/object:os.system counter"),
        "custom-tag-mapping": HELLO.replace("    params:\n", "    params: !!omap\n", 1),
        "binary-tag": HELLO.replace("plugin: counter", "plugin: !!binary aGVsbG8="),
        "bad-binary": HELLO.replace("plugin: counter", "plugin: !!binary '%%%'"),
        "timestamp": HELLO.replace("messages: 1000", "messages: 2001-12-14"),
        "bad-timestamp-tag": HELLO.replace("messages: 1000", "messages: !!timestamp 2001-13-45"),
        "two-documents": HELLO + "---\n" + HELLO,
        "document-end-only": "...\n",
        "directives-flood": "%FOO bar\n" * 20000 + "--- x\n",
        "empty-file": "",
        "only-comments": "# nothing here\n# at all\n",
        "scalar-document": "just a string\n",
        "list-document": "- name: t\n- nodes: {}\n",
        "null-document": "~\n",
        # nesting and sizes
        "deep-flow-5000": "name: t\nnodes: " + "[" * 5000 + "]" * 5000 + "\n",
        "deep-block-5000": "name: t\nnodes:\n" + "".join(" " * (2 * i + 2) + f"k{i}:\n" for i in range(5000)),
        "deep-mapping-64": HELLO.replace("      size: 16384", "      size: 16384\n      deep: " + "{a: " * 62 + "1" + "}" * 62),
        "deep-mapping-70": HELLO.replace("      size: 16384", "      size: 16384\n      deep: " + "{a: " * 70 + "1" + "}" * 70),
        "deep-through-aliases": "name: t\n" + "".join(
            f"l{i}: &l{i} " + "[" * 30 + (f"*l{i - 1}" if i else "x") + "]" * 30 + "\n" for i in range(6)) + "nodes: {}\n",
        "big-int-5000-digits": HELLO.replace("messages: 1000", f"messages: {big_int}"),
        "big-int-key": f"name: t\nnodes:\n  {big_int}: {{role: source}}\n",
        "big-int-4000-digits": HELLO.replace("messages: 1000", "messages: " + "9" * 4000),
        "big-float": HELLO.replace("messages: 1000", "messages: 1e99999"),
        "nan-scan-timeout": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace(
            "scan_timeout: 10", "scan_timeout: .nan"),
        "inf-scan-timeout": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace(
            "scan_timeout: 10", "scan_timeout: .inf"),
        "huge-hwm": HELLO.replace("{pattern: push}", "{pattern: push, hwm: 99999999999999999999}"),
        "long-line": "name: t\ndescription: " + "x" * 500_000 + "\nnodes: {}\n",
        "oversized-file": "name: t\nnodes: {}\n" + "# padding\n" * 110_000,
        "many-values-list": "name: t\nnodes: [" + "1," * 150_000 + "]\n",
        "many-keys": "name: t\nnodes:\n" + "".join(f"  n{i}: {{}}\n" for i in range(30_000)),
        "many-nodes-chain": "name: chain\nnodes:\n  n0: {role: source, plugin: counter, sockets: {out: {pattern: push}}}\n" + "".join(
            f"  n{i}: {{role: stage, plugin: relay, sockets: {{in: {{pattern: pull, connect: n{i - 1}.out}}, "
            f"out: {{pattern: push}}}}}}\n" for i in range(1, 1500)),
        "many-problems": "name: t\nnodes:\n" + "".join(f"  n{i}: {{role: nope{i}, sockets: {{s: {{pattern: x, connect: a.b}}}}}}\n"
                                                     for i in range(2000)),
        # keys that are not strings
        "int-node-name": _nodes("  1:\n" + GOOD_NODE),
        "null-node-name": _nodes("  null:\n" + GOOD_NODE + "  b:\n" + GOOD_NODE),
        "empty-node-name": _nodes("  :\n" + GOOD_NODE),
        "list-node-name": _nodes("  [a]:\n" + GOOD_NODE),
        "mapping-node-name": _nodes("  {a: 1}:\n" + GOOD_NODE),
        "bool-node-name": _nodes("  true:\n" + GOOD_NODE),
        "float-node-name": _nodes("  1.5:\n" + GOOD_NODE),
        "date-node-name": _nodes("  2024-01-01:\n" + GOOD_NODE),
        "mixed-key-types": _nodes("  a:\n" + GOOD_NODE + "  2:\n" + GOOD_NODE + "  ~:\n" + GOOD_NODE),
        "int-socket-name": HELLO.replace("      out: {pattern: push}", "      1: {pattern: push}"),
        "int-top-level-key": "1: x\n" + HELLO,
        # names the runtime cannot use
        "node-name-with-dot": HELLO.replace("  sink:", "  'si.nk':"),
        "node-name-with-slash": HELLO.replace("  sink:", "  'a/b':"),
        "node-name-with-space": HELLO.replace("  sink:", "  'a b':"),
        "node-name-leading-digit": HELLO.replace("  sink:", "  '9sink':"),
        "node-name-unicode": HELLO.replace("  sink:", "  sïnk:"),
        "node-name-too-long": HELLO.replace("  sink:", "  " + "s" * 2000 + ":"),
        "socket-name-too-long": HELLO.replace("      out: {pattern: push}", "      " + "o" * 2000 + ": {pattern: push}"),
        # addresses, hosts and ports
        "ipv6-address": HELLO.replace("nodes:", "hosts:\n  localhost: {address: '::1'}\nnodes:", 1),
        "address-with-port": HELLO.replace("nodes:", "hosts:\n  localhost: {address: '127.0.0.1:5555'}\nnodes:", 1),
        "address-with-scheme": HELLO.replace("nodes:", "hosts:\n  localhost: {address: 'tcp://127.0.0.1'}\nnodes:", 1),
        "address-bad-ipv4": HELLO.replace("nodes:", "hosts:\n  localhost: {address: 300.1.2.3}\nnodes:", 1),
        "address-empty": HELLO.replace("nodes:", "hosts:\n  localhost: {address: ''}\nnodes:", 1),
        "bind-junk": HELLO.replace("nodes:", "hosts:\n  localhost: {address: 127.0.0.1, bind: 'not an interface!'}\nnodes:", 1),
        "bind-ipv6-wildcard": HELLO.replace("nodes:", "hosts:\n  localhost: {address: 127.0.0.1, bind: '::'}\nnodes:", 1),
        "no-hosts": HELLO.replace("nodes:", "hosts: {}\nregistry: {port: 47001}\nnodes:", 1),
        "registry-address-junk": HELLO.replace("nodes:", "registry: {address: 'not an address'}\nnodes:", 1),
        "registry-port-privileged": HELLO.replace("nodes:", "registry: {port: 80}\nnodes:", 1),
        "socket-port-privileged": HELLO.replace("{pattern: push}", "{pattern: push, port: 22}"),
        "registry-port-conflict": HELLO.replace("nodes:", "registry: {port: 47002}\nnodes:", 1).replace(
            "{pattern: push}", "{pattern: push, port: 47002}"),
        "ipc-port": HELLO.replace("{pattern: push}", "{pattern: push, transport: ipc, port: 47003}").replace(
            "connect: source.out}", "connect: source.out, transport: ipc}"),
        "ipc-long-name": HELLO.replace("  source:", "  " + "s" * 60 + ":").replace("connect: source.out",
                                                                             "connect: " + "s" * 60 + ".out")
        .replace("{pattern: push}", "{pattern: push, transport: ipc}").replace(".out}", ".out, transport: ipc}"),
        # pipelines that cannot run
        "aggregator-replicas-2": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace(
            "    role: aggregator\n", "    role: aggregator\n    replicas: 2\n"),
        "producer-to-stage": HELLO.replace("role: source", "role: producer").replace(
            "plugin: counter", "plugin: 4dcamera-sim\n    route: frame_number").replace("      messages: 1000\n      size: 16384\n", "      {}\n"),
        "direct-producer-without-route": (ROOT / "topologies" / "4dcamera-direct.yaml").read_text().replace(
            "    route: frame_number\n", ""),
        "two-nodegroups": (ROOT / "topologies" / "4dcamera-direct.yaml").read_text() + (
            "  nodegroup2:\n    role: nodegroup\n    threads: 4\n    assemble: {key: frame_number, part: module, "
            "parts: 4, shape: [144, 576]}\n    analyses: [{plugin: framesum}]\n    sockets:\n"
            "      data: {pattern: pull, connect: producer.data}\n"),
        "nodegroup-threads-mismatch": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace(
            "threads: 4             # 1:1 with aggregator threads", "threads: 3"),
        "dtype-junk": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace("dtype: uint16", "dtype: 'no such'"),
        "dtype-object": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace("dtype: uint16", "dtype: O"),
        "dtype-struct": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace("dtype: uint16", "dtype: 'i4,i4'"),
        "shape-zero": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace("shape: [144, 576]", "shape: [0, 576]"),
        "shape-empty": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace("shape: [144, 576]", "shape: []"),
        "shape-huge": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace(
            "shape: [144, 576]", "shape: [100000, 100000]"),
        "parts-65": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace("parts: 4,", "parts: 65,"),
        "key-equals-part": (ROOT / "topologies" / "4dcamera-local.yaml").read_text().replace(
            "part: module", "part: frame_number"),
    }
    return [Case(f"hand-{name}", text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"), "hand")
            for name, text in out.items()]


# -- mutations ---------------------------------------------------------------------------------------

NUMBERS = [0, -1, 1, 2, 3, 5, 4096, 4097, 65535, 65536, 10**20, 2**63, -(2**63), 1.5, -0.5, 1e308, True, False, None]
STRINGS = ["", " ", "x", "a.b", "a b", "-x", "x" * 300, "ünïcødé", "名前", "😀", "\u202eevil", "zero\u200bwidth",
           "nul\x00byte", "\x1b[31mred", "line\nbreak", "0.0.0.0", "::1", "tcp://a:1", "../../etc", "nodegroup.data",
           "producer.data", "aggregator.in", "source.out", "uint16", "frame_number", "null", "1", "true"]
CONTAINERS = [[], {}, [1, 2], {"a": 1}, [[[]]], {"role": "source"}, [{"plugin": "framesum"}]]
PLUGINS = ["counter", "checksum", "relay", "discard", "4dcamera-sim", "4dcamera-raw", "framesum", "electron-count",
           "no-such-plugin"]
ROLES = ["source", "stage", "producer", "aggregator", "nodegroup", "sink"]
DTYPES = ["uint8", "uint16", ">u2", "int32", "float32", "float64", "complex64", "bool", "U10", "O", "V8", "i4,i4",
          "(2,)u2", "m8", "nope", "", "uint16 "]
PORTS = [47101, 47102, 0, 80, 1023, 1024, 65535, 65536, -1]


def _load(text: str):
    return YAML(typ="safe", pure=True).load(text)


def _dump(data) -> str:
    y = YAML(typ="safe", pure=True)
    y.default_flow_style = None
    y.width = 4096
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def _paths(data, prefix=()):
    """Every (path, value) in the tree, the root excluded."""
    out = []
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = list(enumerate(data))
    else:
        return out
    for k, v in items:
        out.append(((*prefix, k), v))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _get(data, path):
    for p in path:
        data = data[p]
    return data


def _set(data, path, value):
    _get(data, path[:-1])[path[-1]] = value


def _nest(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def _wrong_value(rng: random.Random):
    pool = rng.choice(["n", "n", "s", "s", "c", "deep"])
    if pool == "n":
        return rng.choice(NUMBERS)
    if pool == "s":
        return rng.choice(STRINGS)
    if pool == "c":
        return copy.deepcopy(rng.choice(CONTAINERS))
    return _nest(rng.choice([10, 40, 63, 65, 100]))


def op_delete(rng, data, text):
    path, _ = rng.choice(_paths(data))
    container = _get(data, path[:-1])
    del container[path[-1]]
    return _dump(data)


def op_retype(rng, data, text):
    path, _ = rng.choice(_paths(data))
    _set(data, path, _wrong_value(rng))
    return _dump(data)


def op_rename_key(rng, data, text):
    keyed = [(p, v) for p, v in _paths(data) if isinstance(p[-1], str)]
    path, value = rng.choice(keyed)
    parent = _get(data, path[:-1])
    new = rng.choice([path[-1] + "s", path[-1][:-1] or "x", path[-1].upper(), "colour", "", "a.b", "ñ",
                      "replicas", "threads", "sockets", "connect", "x" * 100])
    items = [(new if k == path[-1] else k, v) for k, v in parent.items()]
    parent.clear()
    for k, v in items:
        parent.setdefault(k, v)
    return _dump(data)


def op_duplicate_key(rng, data, text):
    lines = text.splitlines(keepends=True)
    keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")]
    i = rng.choice(keyed)
    j = i + 1
    indent = len(lines[i]) - len(lines[i].lstrip())
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
        j += 1
    return "".join(lines[:j] + lines[i:j] + lines[j:])


def _node(rng, data):
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict) or not nodes:
        return None, None
    name = rng.choice(sorted(nodes))
    return name, nodes[name]


def op_plausible(rng, data, text):
    """A small edit a person might make: it may leave a topology that runs, or one that cannot."""
    name, node = _node(rng, data)
    if node is None:
        return None
    nodes = data["nodes"]
    edit = rng.choice(["replicas", "threads", "workers", "batch", "route", "role", "plugin", "connect", "pattern",
                       "transport", "port", "host", "hwm", "scan_timeout", "fallback", "copy", "remove",
                       "analyses", "assemble", "params", "registry", "status", "name"])
    if edit in ("replicas", "threads", "workers", "batch"):
        node[edit] = rng.choice([1, 2, 3, 4, 5, 0, -1, 10**6])
    elif edit == "route":
        node["route"] = rng.choice(["frame_number", "module", "scan", "nope", ""])
    elif edit == "role":
        node["role"] = rng.choice(ROLES)
    elif edit == "plugin":
        node["plugin"] = rng.choice(PLUGINS)
    elif edit in ("connect", "pattern", "transport", "port", "hwm"):
        socks = node.get("sockets")
        if not isinstance(socks, dict) or not socks:
            return None
        sock = socks[rng.choice(sorted(socks))]
        if edit == "connect":
            targets = [f"{n}.{s}" for n, spec in nodes.items() for s in (spec.get("sockets") or {})]
            sock["connect"] = rng.choice([*targets, "nowhere.data", "nodot", None])
            if sock["connect"] is None:
                del sock["connect"]
        elif edit == "pattern":
            sock["pattern"] = rng.choice(["push", "pull", "pub", "sub", "pair", "req", "x"])
        elif edit == "transport":
            for spec in nodes.values():  # both ends, or the link breaks for a plainer reason
                for s in (spec.get("sockets") or {}).values():
                    s["transport"] = "ipc"
        elif edit == "port":
            sock["port"] = rng.choice(PORTS)
        else:
            sock["hwm"] = rng.choice([1, 10, 0, 2**31, 10**12])
    elif edit == "host":
        data["hosts"] = {"here": {"address": "127.0.0.1"},
                         "there": {"address": rng.choice(["127.0.0.1", "localhost", "10.1.2.3", "::1", "x y"])}}
        node["host"] = rng.choice(["here", "there", "nowhere"])
        for other in nodes.values():
            other.setdefault("host", "here")
    elif edit == "scan_timeout":
        node["scan_timeout"] = rng.choice([0.5, 0, -1, 1e9, 86401])
    elif edit == "fallback":
        node["fallback"] = rng.choice(["fallback", "", "a\x00b", "/tmp/x"])
    elif edit == "copy":
        nodes[name + "2"] = copy.deepcopy(node)
    elif edit == "remove":
        del nodes[name]
    elif edit == "analyses":
        node["analyses"] = rng.choice([[], [{"plugin": "discard"}], [{"plugin": "counter"}],
                                       [{"plugin": "framesum"}, {"plugin": "discard", "params": {"delay": 0}}]])
    elif edit == "assemble":
        asm = node.setdefault("assemble", {"key": "frame_number", "part": "module", "parts": 4, "shape": [144, 576]})
        if not isinstance(asm, dict):
            return None
        field = rng.choice(["parts", "shape", "dtype", "key", "part"])
        asm[field] = {"parts": lambda: rng.choice([1, 2, 4, 64, 65, 0]),
                      "shape": lambda: rng.choice([[144, 576], [1], [0, 1], [], [-1, 5], [144, 576, 2], [70000, 70000]]),
                      "dtype": lambda: rng.choice(DTYPES),
                      "key": lambda: rng.choice(["frame_number", "module", "", "nope"]),
                      "part": lambda: rng.choice(["module", "frame_number", ""])}[field]()
    elif edit == "params":
        params = node.setdefault("params", {})
        if not isinstance(params, dict):
            return None
        key, value = rng.choice([("scan_shape", [8, 8]), ("scan_shape", [0, 0]), ("scan_shape", [-1, 4]),
                                 ("scan_shape", [8]), ("electrons_per_frame", -1), ("first_frame", 10**20),
                                 ("payload", "x"), ("messages", 0), ("messages", -1), ("size", 0), ("size", -5),
                                 ("sectors", [0, 1]), ("sectors", [9]), ("unknown_param", 1), ("delay", 0)])
        params[key] = value
    elif edit == "registry":
        data["registry"] = rng.choice([{"port": 47201}, {"port": 80}, {"address": "tcp://127.0.0.1:1"},
                                       {"host": "elsewhere"}, {"address": "junk"}, {"port": 47202, "host": "localhost"}])
    elif edit == "status":
        data["status"] = {"interval": rng.choice([0, 0.001, 1, 100, -1])}
    else:
        data["name"] = rng.choice(["ok-name", "", "a/b", "x" * 200, "ünï"])
    return _dump(data)


def _offset(rng: random.Random, raw: bytes) -> int:
    """A byte offset outside comment lines (a change inside a comment tests nothing)."""
    starts, pos = [], 0
    for line in raw.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith(b"#"):
            starts.append((pos, len(line)))
        pos += len(line)
    start, length = rng.choice(starts)
    return start + rng.randrange(length)


def op_flip(rng, data, text):
    raw = bytearray(text.encode())
    for _ in range(rng.choice([1, 1, 2, 5])):
        i = _offset(rng, bytes(raw))
        raw[i] ^= 1 << rng.randrange(8)
    return bytes(raw)


JUNK = [b"\t", b"\x00", b"\xff", b"\x80", b"{", b"[", b"]", b"&a ", b"*a", b"<<: ", b": ", b"- ", b"'", b'"',
        b"\n  x: y\n", b"%YAML 1.1\n", b"---\n", b"...\n", b"!!binary ", b"!foo ", b"? ", b"|", b">", b"#", b"@", b"`",
        b"\r", b"\x85", b"\xe2\x80\xa8", "ü".encode(), b"\\"]


def op_insert(rng, data, text):
    raw = text.encode()
    i = _offset(rng, raw)
    return raw[:i] + rng.choice(JUNK) + raw[i:]


def op_truncate(rng, data, text):
    raw = text.encode()
    return raw[:_offset(rng, raw)]


def op_lines(rng, data, text):
    lines = text.splitlines(keepends=True)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    edit = rng.choice(["delete", "duplicate", "swap", "indent", "dedent"])
    if edit == "delete":
        del lines[i]
    elif edit == "duplicate":
        lines.insert(i, lines[i])
    elif edit == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif edit == "indent":
        lines[i] = " " * rng.choice([1, 2, 3]) + lines[i]
    else:
        lines[i] = lines[i][rng.choice([1, 2]):]
    return "".join(lines)


def op_alias(rng, data, text):
    """Anchors, aliases and merge keys woven into a real topology."""
    name, node = _node(rng, data)
    if node is None:
        return None
    kind = rng.choice(["merge-copy", "merge-override", "alias-node", "recursive", "bomb", "deep", "merge-list"])
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.rstrip() == f"  {name}:"), None)
    if at is None:
        return None
    if kind in ("merge-copy", "merge-override", "merge-list"):
        lines[at] = f"  {name}: &base\n"
        extra = {"merge-copy": "    <<: *base\n",
                 "merge-override": f"    <<: *base\n    replicas: {rng.choice([1, 2, 0])}\n",
                 "merge-list": "    <<: [*base, {role: stage}]\n"}[kind]
        return "".join(lines) + f"  {name}_copy:\n" + extra
    if kind == "alias-node":
        lines[at] = f"  {name}: &base\n"
        return "".join(lines) + f"  {name}_alias: *base\n"
    if kind == "recursive":
        lines[at] = f"  {name}: &base\n"
        return "".join(lines[:at + 1]) + "    params: {self: *base}\n" + "".join(lines[at + 1:])
    if kind == "bomb":
        return _bomb(rng.choice([6, 8, 12]), 10).replace("name: bomb\n", "").replace("nodes: {}\n", "") + \
            "".join(lines).replace("    role:", "    extra: *a5\n    role:", 1)
    depth = rng.choice([20, 60, 64, 65, 300])
    return "".join(lines[:at + 1]) + "    params: {deep: " + "[" * depth + "]" * depth + "}\n" + "".join(lines[at + 1:])


OPERATORS = [
    (op_delete, 3), (op_retype, 6), (op_rename_key, 2), (op_duplicate_key, 2), (op_plausible, 8),
    (op_flip, 3), (op_insert, 3), (op_truncate, 2), (op_lines, 3), (op_alias, 3),
]


def mutations(seed: int = SEED, n: int = MUTATIONS) -> list[Case]:
    rng = random.Random(seed)
    texts = {p.stem: p.read_text() for p in SOURCES}
    ops = [op for op, weight in OPERATORS for _ in range(weight)]
    seen: set[bytes] = {t.encode() for t in texts.values()}
    out: list[Case] = []
    tries = 0
    while len(out) < n:
        tries += 1
        assert tries < n * 20, "the operators keep making the same cases"
        stem = rng.choice(sorted(texts))
        op = rng.choice(ops)
        result = op(rng, _load(texts[stem]), texts[stem])
        if result is None:
            continue
        raw = result if isinstance(result, bytes) else result.encode("utf-8", "surrogatepass")
        if raw in seen:
            continue
        seen.add(raw)
        out.append(Case(f"{stem}-{op.__name__[3:].replace('_', '-')}-{len(out):03d}", raw, op.__name__[3:]))
    return out


def cases(seed: int = SEED, n: int = MUTATIONS) -> list[Case]:
    """Every case: the hand-written ones, then the mutations; all distinct."""
    out, seen = [], set()
    for case in (*hand_written(), *mutations(seed, n)):
        if case.data not in seen:
            seen.add(case.data)
            out.append(case)
    return out


def digest(all_cases: list[Case]) -> str:
    """One hash of every case, to show the generator is deterministic."""
    h = hashlib.sha256()
    for c in all_cases:
        h.update(c.id.encode() + b"\0" + c.data)
    return h.hexdigest()[:16]
