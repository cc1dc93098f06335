"""`zpipe keys DIR`: make and list the CURVE certificates a secured topology uses (zpipe.security)."""

from __future__ import annotations

import json
import os
import sys


def run(args) -> int:
    from zpipe import security

    names = list(args.identity or [])
    if args.topology:
        from zpipe.topology.load import check_file

        topo, problems = check_file(args.topology, plugins_of=())
        # Only the model is needed here: a key directory that does not exist yet is what we are making.
        problems = [p for p in problems if not p.path.startswith("security.keys")]
        if topo is None and problems:
            for p in problems:
                print(p, file=sys.stderr)
            return 1
        if topo is None:
            names += list(security.SPECIAL) + _identities(args.topology)
        else:
            names += security.identities(topo)
    try:
        made = security.create(args.directory, names, force=args.force) if names else []
        rows = security.listing(args.directory) if os.path.isdir(args.directory) else []
    except security.SecurityError as exc:
        print(f"zpipe keys: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"zpipe keys: {args.directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    state = dict(made)
    if args.json:
        print(json.dumps([{**r, "now": state.get(r["identity"], "")} for r in rows], indent=2))
    else:
        if not rows:
            print(f"zpipe keys: no certificates in {args.directory}", file=sys.stderr)
        for r in rows:
            now = f"  ({state[r['identity']]})" if r["identity"] in state else ""
            print(f"{r['identity']:<24} {r['public']}  secret: {r['secret']}{now}")
    return 1 if any(r["secret"].startswith("LOOSE") or r["public"].startswith("BROKEN") for r in rows) else 0


def _identities(path: str) -> list[str]:
    """The nodes' and replicas' identities of a topology the model rejected only for its missing keys (a second
    parse: names and replica counts only)."""
    from zpipe import security
    from zpipe.topology.yamlpos import parse

    with open(path, encoding="utf-8") as f:
        data = parse(f.read()).data
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict):
        return []
    counts = {name: spec.get("replicas", 1) if isinstance(spec, dict) else 1 for name, spec in nodes.items()}
    valid = {n: c for n, c in counts.items() if isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 4096}
    return [*nodes, *security.replica_identities(valid)]


def add_parser(sub) -> None:
    p = sub.add_parser("keys", help="make (for a topology's identities, or named ones) and list CURVE certificates")
    p.add_argument("directory", help="the key directory (made 0700 if absent)")
    p.add_argument("--topology", help="make a pair for each identity this topology needs: registry, runner, "
                                      "operator, each node and each replica (NODE.R)")
    p.add_argument("--identity", action="append", metavar="NAME", help="make a pair for NAME too (repeatable)")
    p.add_argument("--force", action="store_true", help="replace existing pairs (every peer needs the new keys)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
