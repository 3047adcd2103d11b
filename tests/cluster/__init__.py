"""Real cluster software for the launch tests: a single-node Slurm cluster and Open MPI's mpirun."""
