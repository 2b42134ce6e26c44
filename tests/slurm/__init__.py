"""Local Slurm cluster harness for launch tests (see cluster.py) and the stand-in trainer dist_probe.py."""
