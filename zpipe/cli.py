"""The `zpipe` command: validate, run, replay, acquire, submit, sessions, status, plugins, kv."""

from __future__ import annotations

import argparse
import sys


def cmd_validate(args) -> int:
    """Check each file; every problem is one line, FILE:LINE:COL: path: message, never a traceback."""
    from zpipe.topology.errors import Problem
    from zpipe.topology.load import check_file, printable

    def say(stream, line: str) -> None:
        enc = getattr(stream, "encoding", None) or "utf-8"
        stream.write(line.encode(enc, "backslashreplace").decode(enc, "replace") + "\n")
        stream.flush()

    bad = 0
    for path in args.files:
        shown = printable(path)
        try:
            _, problems = check_file(path)
        except (Exception, RecursionError) as exc:  # a bug of ours, not of the file: still one positioned line
            problems = [Problem(shown, 1, 1, "", printable(f"internal error while validating "
                                                           f"({type(exc).__name__}: {exc}); please report it"))]
        for p in problems:
            say(sys.stderr, str(p))
        if problems:
            bad += 1
            say(sys.stderr, f"{shown}: {len(problems)} problem{'s' * (len(problems) != 1)}")
        elif not args.quiet:
            say(sys.stdout, f"{shown}: ok")
    return 1 if bad else 0


def cmd_run(args) -> int:
    from zpipe.topology.load import check_file

    topo, problems = check_file(args.topology, output_dir=args.output_dir)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.topology}: not started: {len(problems)} problem{'s' * (len(problems) != 1)}", file=sys.stderr)
        return 1
    from zpipe import mpirun
    from zpipe.runner import Runner, RunError

    # --node/--replica start replicas on their own (`--replica rank` under srun or mpiexec, one per task):
    # then MPI, when there is any, is not how the node groups are started.
    if args.mpi:  # a session's tasks as one MPI world (srun --mpi=pmi2 ... --node NG --replica rank --mpi)
        return mpirun.session(topo, host=args.host, nodes=args.node, replica=args.replica, registry=args.registry,
                              output_dir=args.output_dir)
    comm = mpirun.world() if not (args.node or args.replica) else None
    if comm is not None:
        return mpirun.run(topo, args.topology, comm, host=args.host, registry=args.registry,
                          output_dir=args.output_dir)
    try:
        return Runner(topo, args.topology, host=args.host, registry=args.registry, output_dir=args.output_dir,
                      nodes=args.node, replicas=args.replica).run()
    except RunError as exc:
        print(f"zpipe run: {exc}", file=sys.stderr)
        return 2


def cmd_replay(args) -> int:
    import os

    from zpipe.replay import ReplayError, replay_topology, write_topology
    from zpipe.topology.load import check_file

    if not os.path.isdir(args.directory):
        print(f"zpipe replay: {args.directory}: no such directory", file=sys.stderr)
        return 2

    topo, problems = check_file(args.topology)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    from zpipe.runner import Runner, RunError

    try:
        replay = replay_topology(topo, args.directory, args.scan)
        path = write_topology(replay, os.path.join(args.output_dir, f"{replay.name}.yaml"))
        return Runner(replay, path, host=args.host, registry=args.registry, output_dir=args.output_dir).run()
    except (ReplayError, RunError, LookupError) as exc:
        print(f"zpipe replay: {exc}", file=sys.stderr)
        return 2


def cmd_plugins(args) -> int:
    import json

    from zpipe.catalog import catalog

    rows = []
    for name, info in catalog().items():
        params = {}
        if info.cls is not None:
            for fname, f in info.cls.Params.model_fields.items():
                params[fname] = {"type": getattr(f.annotation, "__name__", str(f.annotation)),
                                 "default": None if f.is_required() else repr(f.default),
                                 "description": f.description or ""}
        rows.append({"name": name, "kind": info.kind, "distribution": info.distribution,
                     "object": info.value, "params": params, "error": info.error})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['kind']:<8} {r['distribution']:<24} {r['object']}")
            if r["error"]:
                print(f"    BROKEN: {r['error']}")
            for pname, p in r["params"].items():
                default = "required" if p["default"] is None else f"default {p['default']}"
                desc = f"  {p['description']}" if p["description"] else ""
                print(f"    {pname}: {p['type']} ({default}){desc}")
    return 1 if any(r["error"] for r in rows) else 0


def cmd_status(args) -> int:
    from zpipe.statuscmd import run

    return run(args)


def cmd_kv(args) -> int:
    import threading

    from zpipe.kv.server import serve
    from zpipe.scans.accountant import Accountant

    accountant = []

    def ready(address: str) -> None:
        print(f"zpipe kv: serving at {address}", flush=True)
        # The accountant closes every scan's account beside the registry (zpipe.scans.accountant);
        # it is the server's client, so it starts once the server's loop runs.
        acc = Accountant(address, args.output_dir)
        accountant.append(acc)
        threading.Thread(target=acc.start, name="accountant-start", daemon=True).start()

    try:
        serve(args.bind, advertise=args.advertise, heartbeat=args.heartbeat, on_ready=ready)
    finally:
        for a in accountant:
            a.stop()
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zpipe", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check topology files; exit 1 if any has a problem")
    p.add_argument("files", nargs="+")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run the nodes of a topology placed on this host")
    p.add_argument("topology")
    p.add_argument("--host", help="which of the topology's hosts this is (needed when there are several)")
    p.add_argument("--registry", help="address of a running registry (default: start one if this host owns it, "
                                      "else the registry host's address and port from the topology)")
    p.add_argument("--output-dir", default=".", help="where nodes write their files")
    p.add_argument("--node", action="append", metavar="NAME",
                   help="start only this node of this host (repeatable; default: every node placed here)")
    p.add_argument("--replica", metavar="N|LIST|rank",
                   help="start only these replica numbers (3; 0,2; 0-3), or `rank`: the launcher's rank "
                        "(SLURM_PROCID, PMI_RANK, PMIX_RANK, OMPI_COMM_WORLD_RANK)")
    p.add_argument("--mpi", action="store_true",
                   help="with --node NODEGROUP: the launcher's tasks are one MPI world, rank r its replica r, "
                        "gathering with MPI (srun --mpi=pmi2; see docs/slurm.md)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="stream disk-fallback files through a topology's pipeline")
    p.add_argument("directory", help="where the fallback files are")
    p.add_argument("--topology", default="topologies/4dcamera-local.yaml")
    p.add_argument("--scan", type=int, action="append", help="scan number to replay (repeatable; default: all)")
    p.add_argument("--host")
    p.add_argument("--registry")
    p.add_argument("--output-dir", default=".")
    p.set_defaults(func=cmd_replay)

    from zpipe.acquire import add_parser as add_acquire

    add_acquire(sub)

    from zpipe.keyscmd import add_parser as add_keys

    add_keys(sub)

    from zpipe.submit import add_parser as add_submit

    add_submit(sub)

    from zpipe.sessions import add_parser as add_sessions

    add_sessions(sub)

    p = sub.add_parser("plugins", help="list installed plugins, their kind, distribution and parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("status", help="show a running pipeline's nodes, rates and scans, from its registry")
    p.add_argument("--registry", required=True, help="the pipeline's registry, as `zpipe run` printed it")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--json", action="store_true", help="print every replica (counters, rates) and scan as JSON; exit")
    p.add_argument("--sample", type=float, default=1.0, help="seconds between the snapshots rates come from")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the registry")
    p.add_argument("--keys", metavar="DIR", help="a secured pipeline's key directory (uses its `operator` key)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("kv", help="run a stand-alone registry (key-value store) server")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument("--advertise", help="host or IP clients reach this server at, if --bind is 0.0.0.0")
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--output-dir", help="where the accountant writes each scan's report (default: only in the registry)")
    p.set_defaults(func=cmd_kv)
    return ap


def main(argv: list[str] | None = None) -> int:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` shows where it is stuck
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
