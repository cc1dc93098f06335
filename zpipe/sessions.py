"""Sessions: node replicas started together by a batch job (a Slurm job), seen through the registry.

A replica started inside a Slurm job (SLURM_JOB_ID set), or given ZPIPE_SESSION, says so in
its liveness key (`nodes/{node}/{replica}`, zpipe.roster): a `session` field with the job id,
its node list and the machine. So that a session is still seen once it ended, the replica also
keeps a small record, `sessions/{node}/{replica}/{id}` (a key of its own, as a secured registry
requires): when it joined, whether it is leaving or left, and when. Each replica keeps the records of
its newest KEEP sessions, removing older ones when it joins another. `zpipe sessions` reads both.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time

PREFIX = "sessions/"
SUBTREES = (PREFIX,)
KEEP = 32  # sessions whose records each replica keeps (the newest, by when they were last heard of)
_ID = re.compile(r"[A-Za-z0-9_.:+@=-]{1,64}")


def current(env=None) -> dict | None:
    """The session this process runs in: ZPIPE_SESSION, else the Slurm job; None outside any."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "").strip() or None
    sid = env.get("ZPIPE_SESSION", "").strip() or job
    if sid is None:
        return None
    if not _ID.fullmatch(sid):  # it becomes part of a key: letters, digits and a little punctuation only
        sid = re.sub(r"[^A-Za-z0-9_.:+@=-]", "_", sid)[:64]
    return {"id": sid, "job": job, "nodelist": env.get("SLURM_JOB_NODELIST") or None,
            "hostname": socket.gethostname(), "scheduler": "slurm" if job else None}


def fields(session: dict | None) -> dict:
    """What to add to a liveness value: {"session": ...} in a session, nothing outside."""
    return {"session": session} if session else {}


def record(kv, session: dict | None, node: str, replica: int, *, state: str, host: str | None = None,
           pipe: str | None = None) -> None:
    """Write this replica's record of its session (`joined`, `leaving`, `left`); nothing outside a session.
    Never raises: a registry that is gone must not stop a replica from leaving."""
    if not session:
        return
    try:
        key = f"{PREFIX}{node}/{int(replica)}/{session['id']}"
        now = time.time()
        old = kv.get(key) if state != "joined" else None
        value = {"session": session, "node": node, "replica": int(replica), "host": host, "pipe": pipe,
                 "pid": os.getpid(), "state": state,
                 "joined": old.get("joined", now) if isinstance(old, dict) else now, "changed": now}
        if state == "left":
            value["left"] = now
        kv.set(key, value)
        if state == "joined":
            prune(kv, node, replica, keep_id=session["id"])
    except Exception as exc:  # the registry may be gone; the record is a courtesy
        print(f"zpipe: could not record session {session.get('id')!r} ({state}): {exc}", file=sys.stderr)


def prune(kv, node: str, replica: int, keep_id: str, keep: int = KEEP) -> list[str]:
    """Remove this replica's records of all but its newest `keep` sessions (never `keep_id`'s); the ids removed."""
    mine = f"{PREFIX}{node}/{int(replica)}/"
    newest: dict[str, float] = {}
    for k, v in kv.items(mine).items():
        t = v.get("changed", 0.0) if isinstance(v, dict) else 0.0
        newest[k[len(mine):]] = t if isinstance(t, (int, float)) else 0.0
    newest[keep_id] = float("inf")
    old = sorted(newest, key=newest.get, reverse=True)[keep:]
    for sid in old:
        kv.delete(mine + sid)
    return old


def summarize(items: dict) -> tuple[list[dict], list[str]]:
    """Sessions from the registry's `nodes/` and `sessions/` keys, newest first, and the node groups that run
    outside any session. Each session: id, job, nodes, replicas {label: alive|leaving|left|gone}, state
    (running, leaving, ended, or lost: a replica disappeared without leaving), started, ended."""
    found: dict[str, dict] = {}
    outside: list[str] = []

    def entry(session: dict) -> dict:
        sid = str(session.get("id"))
        return found.setdefault(sid, {"id": sid, "job": session.get("job"), "nodelist": session.get("nodelist"),
                                      "hosts": set(), "replicas": {}, "started": None, "ended": None,
                                      "pipe": None})

    def label(v: dict) -> str:
        return f"{v.get('node')}[{v.get('replica')}]"

    for k, v in items.items():
        if not (k.startswith("nodes/") and isinstance(v, dict)):
            continue
        s = v.get("session")
        if isinstance(s, dict) and s.get("id") is not None:
            e = entry(s)
            e["replicas"][label(v)] = "leaving" if v.get("leaving") is True else "alive"
            e["hosts"].add(s.get("hostname") or v.get("host"))
            if isinstance(v.get("started"), (int, float)):
                e["started"] = min(filter(None, (e["started"], v["started"])))
            e["pipe"] = e["pipe"] or v.get("pipe")
        elif v.get("role") == "nodegroup":
            outside.append(label(v))
    for k, v in items.items():
        if not (k.startswith(PREFIX) and isinstance(v, dict) and isinstance(v.get("session"), dict)):
            continue
        e = entry(v["session"])
        e["hosts"].add(v["session"].get("hostname") or v.get("host"))
        e["pipe"] = e["pipe"] or v.get("pipe")
        if isinstance(v.get("joined"), (int, float)):
            e["started"] = min(filter(None, (e["started"], v["joined"])))
        lab = label(v)
        if lab in e["replicas"] and e["replicas"][lab] in ("alive", "leaving"):
            continue  # still alive: the liveness key says more than the record
        e["replicas"][lab] = "left" if v.get("state") == "left" else "gone"
        end = v.get("left") if v.get("state") == "left" else v.get("changed")
        if isinstance(end, (int, float)):
            e["ended"] = max(e["ended"] or 0.0, end)
    rows = []
    for e in found.values():
        states = set(e["replicas"].values())
        if "alive" in states:
            e["state"] = "leaving" if "leaving" in states else "running"
        elif "leaving" in states:
            e["state"] = "leaving"
        else:
            e["state"] = "lost" if "gone" in states else "ended"
        if e["state"] not in ("ended", "lost"):
            e["ended"] = None
        e["hosts"] = sorted(h for h in e["hosts"] if h)
        e["replicas"] = dict(sorted(e["replicas"].items()))
        rows.append(e)
    rows.sort(key=lambda e: (e["started"] or 0.0), reverse=True)
    return rows, sorted(outside)


def _when(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "-"


def table(rows: list[dict], outside: list[str]) -> str:
    head = ("SESSION", "JOB", "STATE", "NODES", "NODE GROUPS", "STARTED", "ENDED")
    lines = [head]
    for e in rows:
        groups = ", ".join(f"{lab} {st}" for lab, st in e["replicas"].items())
        lines.append((e["id"], e["job"] or "-", e["state"], e["nodelist"] or ",".join(e["hosts"]) or "-", groups,
                      _when(e["started"]), _when(e["ended"])))
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    if not rows:
        out.append("(no sessions)")
    if outside:
        out.append(f"node groups outside any session: {', '.join(outside)}")
    return "\n".join(out)


def add_parser(sub) -> None:
    p = sub.add_parser("sessions", help="list the sessions (batch jobs of node groups) known to a pipeline's registry")
    p.add_argument("--registry", required=True, help="the pipeline's registry, as `zpipe run` printed it")
    p.add_argument("--json", action="store_true", help="print the sessions as JSON")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the registry")
    p.add_argument("--keys", metavar="DIR", help="a secured pipeline's key directory (uses its `operator` key)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from zpipe.kv import KVClient
    from zpipe.security import SecurityError, operator_curve

    try:
        kv = KVClient(args.registry, ("nodes/", PREFIX), name="zpipe-sessions", connect_timeout=args.connect_timeout,
                      curve=operator_curve(args.keys)).start()
    except SecurityError as exc:
        print(f"zpipe sessions: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, RuntimeError) as exc:
        print(f"zpipe sessions: the registry at {args.registry} does not answer: {exc}", file=sys.stderr)
        return 2
    try:
        rows, outside = summarize(kv.items())
    finally:
        kv.close()
    if args.json:
        print(json.dumps({"registry": args.registry, "sessions": rows, "outside": outside}, indent=1))
    else:
        print(table(rows, outside))
    return 0
