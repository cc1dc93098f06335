#!/bin/sh
#SBATCH -N 1 -n 2
#SBATCH --qos=realtime
srun {python} -m zpipe run {tmp}/services.yaml --host compute --node nodegroup --replica rank
