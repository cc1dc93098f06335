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
