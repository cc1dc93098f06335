"""`zpipe acquire`: ask a running pipeline's producers (run as a service) for acquisitions.

Each acquisition is a request in the registry (zpipe.acquisitions); the producers answer with
the scan number and where it goes (node groups, or disk). With --wait, the command waits for
each scan's account and prints it, and its exit code says how they ended, as `zpipe run`'s does
(docs/accounting.md): 0 every scan complete, 3 some incomplete, 4 some failed; 1 a request was
refused or not taken in time; 2 a usage error.
"""

from __future__ import annotations

import re
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("acquire", help="ask a running pipeline's producers (service: true) for acquisitions")
    p.add_argument("--registry", required=True, help="the pipeline's registry, as `zpipe run` printed it")
    p.add_argument("--keys", metavar="DIR", help="a secured pipeline's key directory (uses its `operator` key)")
    p.add_argument("--shape", help="scan positions, WIDTHxHEIGHT (the source's `scan_shape`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a request parameter of the source (see `zpipe plugins`); VALUE is read as YAML")
    p.add_argument("--scan", type=int, help="the scan number (default: the next after the pipeline's last)")
    p.add_argument("--replay", metavar="DIR", help="replay recorded files (a disk fallback) from DIR, on the "
                   "producers' hosts (relative: to their output directory)")
    p.add_argument("--replay-scan", type=int, help="which scan of DIR to replay (needed if there are several)")
    p.add_argument("--count", type=int, default=1, help="this many acquisitions, one after the other")
    p.add_argument("--wait", action="store_true", help="wait for each scan's account and print it")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for a producer to take each request")
    p.add_argument("--wait-timeout", type=float, default=600.0, help="seconds to wait for each scan's account")
    p.set_defaults(func=run)


def _value(text: str):
    """A --set value read as YAML (safe: plain data only): 3, 0.5, [64, 64], true, text."""
    import io

    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(io.StringIO(text))


def _params(args) -> dict:
    from ruamel.yaml.error import YAMLError

    params: dict = {}
    if args.shape:
        m = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", args.shape)
        if not m:
            raise ValueError(f"--shape {args.shape!r}: expected WIDTHxHEIGHT, e.g. 64x64")
        params["scan_shape"] = [int(m.group(1)), int(m.group(2))]
    for item in args.set:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = _value(text)
        except YAMLError as exc:
            raise ValueError(f"--set {item!r}: the value is not YAML: {exc}") from None
    return params


def run(args) -> int:
    from zpipe import acquisitions
    from zpipe.kv import KVClient
    from zpipe.runtime import pipeline_id

    try:
        params = _params(args)
    except ValueError as exc:
        print(f"zpipe acquire: {exc}", file=sys.stderr)
        return 2
    if args.replay and params:
        print("zpipe acquire: a replay takes no source parameters (the files say what the scan was)", file=sys.stderr)
        return 2
    if args.count < 1:
        print("zpipe acquire: --count must be at least 1", file=sys.stderr)
        return 2
    try:
        from zpipe.security import operator_curve

        kv = KVClient(args.registry, ("pipeline", "scans/", "acquired/"), name="acquire",
                      curve=operator_curve(args.keys)).start()
    except (TimeoutError, RuntimeError) as exc:
        print(f"zpipe acquire: the registry at {args.registry} does not answer: {exc}", file=sys.stderr)
        return 1
    outcomes: list[str] = []
    try:
        try:
            pipe = pipeline_id(kv)
        except RuntimeError as exc:
            print(f"zpipe acquire: {exc}", file=sys.stderr)
            return 1
        for i in range(args.count):
            replay = None
            if args.replay:
                replay = {"directory": args.replay}
                if args.replay_scan is not None:
                    replay["scan"] = args.replay_scan
            scan = args.scan + i if args.scan is not None else None
            rid = acquisitions.request(kv, pipe, params, replay=replay, scan=scan)
            ans = _await(lambda: acquisitions.answer_of(kv, rid), args.timeout)
            if ans is None:
                kv.delete(acquisitions.REQUESTS + rid)  # not taken: withdrawn, never served late
                ans = _await(lambda: acquisitions.answer_of(kv, rid), 1.0)  # ... unless taken just before
            if ans is None:
                print(f"acquisition {rid}: no producer took it within {args.timeout:g} s (is a producer running "
                      f"with `service: true` on this registry?); withdrawn", file=sys.stderr)
                return 1
            if ans.get("error"):
                print(f"acquisition {rid}: refused: {ans['error']}", file=sys.stderr)
                return 1
            n = ans.get("scan")
            where = f"to node groups {ans.get('node_groups')}" if not ans.get("to_disk") else "to disk"
            print(f"acquisition {rid}: scan {n} {where}", flush=True)
            if args.wait:
                outcome, line = _account(kv, n, pipe, args.wait_timeout)
                outcomes.append(outcome)
                print(line, flush=True)
    finally:
        kv.close()
    if "failed" in outcomes:
        return 4
    if "incomplete" in outcomes:
        return 3
    return 0


def _await(probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.05)
    return None


def _account(kv, scan: int, pipe: str, timeout: float) -> tuple[str, str]:
    """(outcome, line) once the scan's account is closed (the accountant's summary), within timeout."""
    def closed():
        rec = kv.get(f"scans/{scan}")
        if not isinstance(rec, dict) or rec.get("pipe") != pipe:
            return None
        if isinstance(rec.get("summary"), str) and rec.get("outcome") in ("complete", "incomplete", "failed"):
            return rec
        return None

    rec = _await(closed, timeout)
    if rec is None:
        return "failed", f"scan {scan}: no account within {timeout:g} s (is the registry's accountant running?)"
    return rec["outcome"], rec["summary"]
