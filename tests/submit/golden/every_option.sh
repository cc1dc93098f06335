#!/bin/bash
# A zpipe session: 2 node groups of nodegroup (4dcamera-local), host compute of the topology.
# Rendered by `zpipe submit`; the job's node groups join the running pipeline through its registry.
#SBATCH --job-name=scan-session
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=1-02:30:00
#SBATCH --partition=debug
#SBATCH --account=m1234
#SBATCH --output={tmp}/session-%j.out
#SBATCH --signal=B:INT@120
#SBATCH --constraint=cpu
#SBATCH --mail-type=END

# The job's end (its time limit, `scancel`) signals every task: each node group leaves gracefully
# (finishes what it was sent, hands back the rest, deregisters); the producers go back to disk.
# This shell only waits for the step to end.
trap 'echo "zpipe session ${SLURM_JOB_ID}: the job is ending; its node groups leave" >&2' TERM INT
# The warning (--signal B:INT@120) comes to this shell only: it passes it on to the tasks (a signal
# to srun itself would end them at once).
trap 'echo "zpipe session ${SLURM_JOB_ID}: warned; its node groups leave" >&2; scancel --signal=TERM "$SLURM_JOB_ID"' INT

# One MPI world: a rank that fails ends the step (the others would wait for it in the gathering).
srun --mpi=pmi2 --kill-on-bad-exit=1 \
    {python} -m zpipe run {tmp}/services.yaml --host compute --node nodegroup \
    --replica rank --mpi --output-dir {tmp}/out --registry tcp://127.0.0.1:5599 &
step=$!
while :; do
    wait "$step"
    code=$?
    kill -0 "$step" 2>/dev/null || break   # a trapped signal interrupted `wait`: the step still runs
done
# 130: the node groups left when they were asked to (the warning, scancel): a session's normal end.
[ "$code" = 130 ] && code=0
exit "$code"
