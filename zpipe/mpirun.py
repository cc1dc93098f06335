"""`mpiexec -n K zpipe run TOPOLOGY`: the node groups are the K MPI ranks, as in the paper.

Rank 0 is also the runner: it starts the registry and every other node as usual, and runs
node-group replica 0 in a thread; rank r runs replica r. Results are gathered with MPI
(see zpipe.gather.MpiGather), so one file per scan is written on the scan's first rank.
"""

from __future__ import annotations

import os
import sys
import threading

from zpipe.topology import Topology

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


def world():
    """MPI_COMM_WORLD when started by mpiexec/srun with more than one rank, else None (no MPI import)."""
    if not any(int(os.environ.get(v, "1") or 1) > 1 for v in _SIZE_VARS):
        return None
    try:
        from mpi4py import MPI
    except ImportError as exc:  # the `mpi` extra is not installed
        raise SystemExit(f"zpipe run: started by mpiexec/srun, but mpi4py cannot be imported ({exc}); "
                         f"install zpipe's mpi extra: pip install 'zpipe[mpi]'") from None

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def run(topology: Topology, path: str, comm, *, host: str | None, registry: str | None, output_dir: str) -> int:
    from zpipe.node import run_replica
    from zpipe.replay import write_topology
    from zpipe.runner import Runner, RunError, pick_host

    rank, size = comm.Get_rank(), comm.Get_size()
    groups = [n for n, s in topology.nodes.items() if s.role == "nodegroup"]
    if len(groups) != 1:
        if rank == 0:
            print(f"zpipe run: under MPI the topology needs exactly one nodegroup node, found {groups}", file=sys.stderr)
        return 2
    ng = groups[0]
    nodes = dict(topology.nodes)
    nodes[ng] = nodes[ng].model_copy(update={"replicas": size})  # one node-group replica per rank
    topo = topology.model_copy(update={"nodes": nodes})
    try:
        here = pick_host(topo, host)
    except RunError as exc:
        print(f"zpipe run: {exc}", file=sys.stderr)
        return 2

    if rank != 0:
        address, _ = comm.bcast(None, root=0)
        if address is None:
            return 1  # rank 0 could not start
        return run_replica(topo, ng, rank, here, address, output_dir, mpi=comm)

    mpi_path = write_topology(topo, os.path.join(os.path.abspath(output_dir), f"{topo.name}-mpi{size}.yaml"))
    result: list[int] = []
    runner = None

    def start_rank0_group(address: str) -> None:
        comm.bcast((address, mpi_path), root=0)

        def body() -> None:
            result.append(run_replica(topo, ng, 0, here, address, output_dir, mpi=comm, stop=runner._stop))

        thread = threading.Thread(target=body, name=f"{ng}[0]", daemon=True)
        runner.local.append((f"{ng}[0]", thread, result))
        thread.start()

    runner = Runner(topo, mpi_path, host=here, registry=registry, output_dir=output_dir,
                    exclude=frozenset({ng}), on_registry=start_rank0_group)
    try:
        code = runner.run()
    finally:
        if not runner.local:  # never got as far as starting the node groups: release the other ranks
            comm.bcast((None, None), root=0)
    for _, thread, _ in runner.local:
        thread.join()
    return code if code else (result[0] if result else 1)


def launcher_size(env=None) -> tuple[int, str] | None:
    """How many tasks the launcher started (srun, mpiexec), and the variable that says so; None outside one."""
    env = os.environ if env is None else env
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = env.get(var, "").strip()
        if value.isdigit():
            return int(value), var
    return None


def session(topology: Topology, *, host: str | None, nodes, replica: str | None, registry: str | None,
            output_dir: str) -> int:
    """`srun --mpi=pmi2 zpipe run TOPOLOGY --node NODEGROUP --replica rank --mpi`: a session's tasks are one MPI
    world whose rank r is node-group replica r, joining a running pipeline through its registry, results
    gathered with MPI (zpipe.gather.MpiGather). Fails fast, in one line, when the tasks are not one world."""
    from zpipe.hosts import AddressError, registry_from_topology
    from zpipe.node import run_replica
    from zpipe.runner import RunError, pick_host

    def fail(message: str) -> int:
        print(f"zpipe run --mpi: {message}", file=sys.stderr, flush=True)
        return 2

    groups = [n for n in nodes or () if n in topology.nodes and topology.nodes[n].role == "nodegroup"]
    if len(nodes or ()) != 1 or len(groups) != 1:
        return fail("give exactly one nodegroup node with --node: the MPI ranks are its replicas")
    ng = groups[0]
    if replica not in (None, "rank"):
        return fail(f"--replica {replica}: under --mpi each rank is the replica of its number (--replica rank)")
    try:
        here = pick_host(topology, host, nodes)
    except RunError as exc:
        return fail(str(exc))
    try:
        from mpi4py import MPI
    except ImportError as exc:
        return fail(f"mpi4py cannot be imported ({exc}); install zpipe's mpi extra: pip install 'zpipe[mpi]'")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    launched = launcher_size()
    if launched and launched[0] != size:
        # srun --mpi=none (or a PMI the MPI library does not speak): every task is rank 0 of a world of its own.
        return fail(f"the {launched[0]} tasks ({launched[1]}) did not form one MPI world: this one is rank {rank} of "
                    f"{size}; start them with `srun --mpi=pmi2` (zpipe submit --mpi pmi2), or run without --mpi")
    count = topology.nodes[ng].replicas
    if size > count:
        return fail(f"{size} MPI ranks, but {ng!r} has {count} replicas: start at most {count} tasks, or raise "
                    f"`replicas`")
    try:
        address = registry or topology.registry.address or registry_from_topology(topology)
    except AddressError as exc:
        return fail(str(exc))
    # Replicas started separately must have distinct numbers (as zpipe.runner checks): every rank looks for a
    # live twin of its own, and all stop if any finds one (a rank alone would wait forever in the gathering).
    problem = _twin(topology, ng, rank, address)
    if comm.allreduce(1 if problem else 0) > 0:
        return fail(problem or "another rank of this MPI world cannot start (its line says why); stopping")
    print(f"zpipe: {topology.name} on host {here}: {ng}[{rank}] as MPI rank {rank} of {size}, registry at {address}",
          file=sys.stderr, flush=True)
    import logging

    logging.basicConfig(level=os.environ.get("ZPIPE_LOG", "INFO"), stream=sys.stderr,
                        format=f"%(levelname)s {ng}[{rank}] %(name)s: %(message)s")
    return run_replica(topology, ng, rank, here, address, output_dir, mpi=comm)


def _twin(topology: Topology, node: str, replica: int, registry: str) -> str | None:
    """Why `node[replica]` cannot start here (it is alive in the pipeline already, or the registry does not
    answer), or None. A key of a replica that just died is waited out (its TTL)."""
    import time

    from zpipe import roster, security
    from zpipe.kv import KVClient

    try:
        kv = KVClient(registry, (roster.PREFIX,), name=f"{node}[{replica}]-start", connect_timeout=30.0,
                      curve=security.client_for(topology, node, replica)).start()
    except security.SecurityError as exc:
        return str(exc)
    except (TimeoutError, RuntimeError) as exc:
        return f"the registry at {registry} does not answer: {exc}"
    try:
        deadline = time.monotonic() + roster.TTL + 1.0
        while True:
            value = kv.get(roster.key(node, replica))
            if not isinstance(value, dict) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        kv.close()
    if isinstance(value, dict):
        return (f"{node}[{replica}] (pid {value.get('pid')} on host {value.get('host')!r}) is already running in "
                f"this pipeline; end that session first, or start other replica numbers")
    return None
