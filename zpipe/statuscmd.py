"""`zpipe status`: watch a running pipeline from any terminal, reading only its key-value store."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console

from zpipe.kv import KVClient
from zpipe.scans.record import plain
from zpipe.view import Display, Tracker, render, to_json


def run(args) -> int:
    try:
        # Only the subtrees the view reads: endpoints and flow keys would be traffic for nothing.
        from zpipe.security import operator_curve

        kv = KVClient(args.registry, subtrees=("status/", "scans/", "preview/", "security/"), name="zpipe-status",
                      connect_timeout=args.connect_timeout, curve=operator_curve(getattr(args, "keys", None))).start()
    except (TimeoutError, RuntimeError) as exc:
        print(f"zpipe status: {exc}", file=sys.stderr)
        return 2
    try:
        tracker = Tracker().attach(kv)
        if args.json or args.once:
            time.sleep(args.sample)  # the second snapshot: rates need two publications of each replica
            picture = tracker.picture()
            refused = kv.items("security/")  # a secured pipeline's counts of refused handshakes and writes
            if args.json:
                print(json.dumps(plain({"registry": args.registry, **to_json(picture),
                                        **({"security": refused} if refused else {})}), indent=1, default=str))
            else:
                console = Console()
                console.print(render(picture, f"registry {args.registry}", console.width))
                line = security_line(refused, picture.rows)
                if line:
                    console.print(line, highlight=False, soft_wrap=True)  # one line, however wide
            return 0
        console = Console()
        display = Display(tracker, console, f"registry {args.registry}").start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
        finally:
            display.stop()
    finally:
        kv.close()


def security_line(items: dict, rows=()) -> str | None:
    """One line of a secured pipeline's refusals: handshakes at the registry, writes by identity, and
    connections each replica's data sockets refused (its status's `refused`, from the picture's rows);
    None when there is nothing of the kind."""
    data = {r.label: r.snapshot["refused"] for r in rows
            if isinstance(r.snapshot.get("refused"), int) and r.snapshot["refused"] > 0}
    if not items and not data:
        return None
    hs = items.get("security/handshakes") or {}
    denied = {k.rsplit("/", 1)[-1]: v.get("writes", 0) for k, v in items.items()
              if k.startswith("security/denied/") and isinstance(v, dict)}
    parts = [f"{hs.get('rejected', 0) if isinstance(hs, dict) else 0} handshakes refused by the registry"]
    if denied:
        parts.append("writes refused: " + ", ".join(f"{who} {n}" for who, n in sorted(denied.items())))
    if data:
        parts.append("connections refused at data sockets: " + ", ".join(f"{r} {n}" for r, n in sorted(data.items())))
    return "security: " + "; ".join(parts)
