"""Run a key-value server: ``python -m zpipe.kv --bind tcp://127.0.0.1:5555``.

Prints the bootstrap address (what clients connect to) on one line once bound,
so a script or test that started it with port 0 learns where it is.
"""

from __future__ import annotations

import argparse
import sys

from .server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zpipe.kv", description=__doc__)
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555", help="bootstrap (snapshot) endpoint")
    parser.add_argument("--advertise", default=None, help="host clients should use if bound to 0.0.0.0")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--pub", default=None, help="updates endpoint (default: bootstrap host, any port)")
    parser.add_argument("--collector", default=None, help="collector endpoint (default: bootstrap host, any port)")
    args = parser.parse_args(argv)

    def ready(address: str) -> None:
        print(address, flush=True)

    serve(
        args.bind,
        advertise=args.advertise,
        heartbeat=args.heartbeat,
        on_ready=ready,
        pub_bind=args.pub,
        collector_bind=args.collector,
    )


if __name__ == "__main__":
    sys.exit(main())
