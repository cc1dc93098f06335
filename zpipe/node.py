"""One node replica in its own process: `python -m zpipe.node ...`, started and supervised by the runner.

The process dies with its runner (PR_SET_PDEATHSIG), answers SIGTERM by leaving gracefully
(roles that can: zpipe.roles.RoleSpec.leaves) or stopping, a second SIGTERM by stopping at once,
and reports a crash with its traceback on stderr and in the key-value store. It imports its own
node's plugins only (the runner has validated the whole topology): a producer never holds the
node groups' numba or h5py, and an aggregator imports no plugin at all.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback

from zpipe.roles import ROLES
from zpipe.topology import load_topology

SAME_REQUEST = 2.0  # s: signals this close to the first are the same request to leave


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the runner's process-group kill still covers us
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zpipe.node")
    ap.add_argument("--topology", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--replica", type=int, default=0)
    ap.add_argument("--host", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--address", help="the address peers reach this host at (default: the topology's, resolved here)")
    ap.add_argument("--output-dir", default=".")
    ap.add_argument("--parent", type=int, default=0, help="pid of the runner; exit if it is gone")
    args = ap.parse_args(argv)
    _die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` shows where a node is stuck
    if args.parent and os.getppid() != args.parent:
        return 1  # the runner died before we could ask to die with it
    label = f"{args.node}[{args.replica}]"
    logging.basicConfig(level=os.environ.get("ZPIPE_LOG", "INFO"), stream=sys.stderr,
                        format=f"%(levelname)s {label} %(name)s: %(message)s")
    # Our own plugins are imported (and their params checked) here, before we register: a node
    # whose plugin cannot load never looks alive.
    topology = load_topology(args.topology, plugins_of=[args.node])
    from zpipe.security import SecurityError

    try:
        return run_replica(topology, args.node, args.replica, args.host, args.registry, args.output_dir,
                           address=args.address)
    except SecurityError as exc:  # a key this replica cannot use (missing, loose): one line, naming the file
        print(f"{label}: {exc}", file=sys.stderr)
        return 1


def _leave_overdue(rt, within: float) -> None:
    if not rt.stop.is_set():
        logging.getLogger("zpipe.node").warning("%s: still not gone %g s after it was asked to leave; stopping",
                                                rt.label, within)
        rt.stop.set()


def run_replica(topology, node: str, replica: int, host: str, registry: str, output_dir: str,
                *, mpi=None, stop=None, address: str | None = None) -> int:
    """Run one replica to its end in this process; returns its exit code.

    In a process of its own (main thread) it answers SIGTERM/SIGINT; in a thread (an MPI
    rank's node group) the caller stops it through `stop`, a threading.Event.
    """
    spec = topology.nodes[node]
    role = ROLES[spec.role]
    from zpipe.runtime import NodeRuntime  # heavy imports after argument errors are out of the way

    main = threading.current_thread() is threading.main_thread()
    early: list[int] = []  # signals that came while the runtime was being made (it registers us)
    if main:
        signal.signal(signal.SIGTERM, lambda signum, _f: early.append(signum))
        signal.signal(signal.SIGINT, lambda signum, _f: early.append(signum))
    rt = NodeRuntime(topology, node, replica, host, registry, output_dir=output_dir, address=address)
    rt.mpi = mpi
    if stop is not None:
        rt.stop = stop
    if main:
        first: list[float] = []

        def on_signal(signum, _frame):
            # The first SIGTERM/SIGINT asks a role that can leave gracefully to do so (a node group
            # finishes what it was sent and hands back the rest; a producer finishes its scan); a
            # later one, or any for the other roles, stops at once. Signals within SAME_REQUEST of
            # the first are that same request (a batch system signals every process of a job, and
            # the runner forwards its own).
            now = time.monotonic()
            if first and now - first[0] < SAME_REQUEST:
                return
            if role.leaves and not rt.leave.is_set():
                first.append(now)
                rt.leave.set()
                logging.getLogger("zpipe.node").info("%s: leaving (%s): finishing what is under way, %g s at "
                                                     "most; a second signal stops at once", rt.label,
                                                     signal.Signals(signum).name, role.leave_within)
                backstop = threading.Timer(role.leave_within, _leave_overdue, args=(rt, role.leave_within))
                backstop.daemon = True
                backstop.start()
            else:
                rt.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for signum in early:
            on_signal(signum, None)
    drain = False
    rt.meter.state = "idle"
    try:
        if role.plugin_kind:
            from zpipe import catalog

            cls = catalog.get(spec.plugin)
            params = cls.Params.model_validate(spec.params)

            def make_plugin():
                return cls(params)
        else:
            make_plugin = None
        totals = role.load()(rt, make_plugin)
        rt.kv.set(rt.key("totals"), totals)  # outlives the process, for the runner's summary
        rt.meter.state = "done"
        drain = True
        return 0
    except InterruptedError as exc:
        rt.meter.state = "stopping"
        stopped = rt.stop.is_set()
        # Say so: a replica that leaves early must never look like one that finished.
        logging.getLogger("zpipe.node").log(logging.INFO if stopped else logging.ERROR, "%s[%d] stopped (%s)%s",
                                            node, replica, exc or "interrupted",
                                            "" if stopped else "\n" + traceback.format_exc())
        return 0 if stopped else 1
    except Exception:
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        rt.meter.state = "failed"
        rt.meter.errors += 1
        rt.meter.warnings.append(tb.strip().splitlines()[-1][:300])
        try:
            rt.kv.set(rt.key("failures"), {"error": tb[-4000:], "time": time.time()})
        except Exception:
            pass
        return 1
    finally:
        rt.close(drain=drain)


if __name__ == "__main__":
    raise SystemExit(main())
