#!/bin/bash
# A zpipe session: 2 node groups of nodegroup (4dcamera-local), host compute of the topology.
# Rendered by `zpipe submit`; the job's node groups join the running pipeline through its registry.
#SBATCH --job-name=zpipe-4dcamera-local
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --signal=TERM@60

# The job's end (its time limit, `scancel`) signals every task: each node group leaves gracefully
# (finishes what it was sent, hands back the rest, deregisters); the producers go back to disk.
# This shell only waits for the step to end.
trap 'echo "zpipe session ${SLURM_JOB_ID}: the job is ending; its node groups leave" >&2' TERM INT

srun --mpi=none --kill-on-bad-exit=0 \
    {python} -m zpipe run {tmp}/services.yaml --host compute --node nodegroup \
    --replica rank --output-dir {tmp} &
step=$!
while :; do
    wait "$step"
    code=$?
    kill -0 "$step" 2>/dev/null || break   # a trapped signal interrupted `wait`: the step still runs
done
# 130: the node groups left when they were asked to (the warning, scancel): a session's normal end.
[ "$code" = 130 ] && code=0
exit "$code"
