"""Start/stop a throw-away local Slurm cluster by hand (tools/slurm_local.sh runs `python -m tests.slurm`)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .cluster import ClusterError, LocalSlurmCluster
from .install import SlurmUnavailable


def _main(argv: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tools/slurm_local.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop", "status", "env", "logs"])
    p.add_argument(
        "--dir",
        default=os.environ.get("MINIMAX_SLURM_DIR", "/tmp/mmslurm-local"),
        help="cluster directory (default $MINIMAX_SLURM_DIR or /tmp/mmslurm-local)",
    )
    p.add_argument("--nodes", default="n1,n2")
    p.add_argument("--cpus-per-node", type=int, default=1)
    a = p.parse_args(argv)
    nodes = a.nodes.split(",")
    if a.action != "start" and (Path(a.dir) / "cluster.json").exists():
        nodes = json.loads((Path(a.dir) / "cluster.json").read_text())["nodes"]
    c = LocalSlurmCluster(a.dir, nodes=nodes, cpus_per_node=a.cpus_per_node, keep_workdir=True)
    if a.action == "start":
        if c.pid("slurmctld"):
            print(f"already running in {c.dir}", file=sys.stderr)
            return 1
        try:
            c.start()
        except (SlurmUnavailable, ClusterError) as e:
            print(e, file=sys.stderr)
            return 1
        print(f"# cluster up in {c.start_seconds:.1f}s; dir {c.dir}\n{c.shell_env()}")
    elif a.action == "stop":
        c.stop()
        print(f"stopped (files kept in {c.dir})", file=sys.stderr)
    elif a.action == "status":
        pids = {k: c.pid(k) for k in c.pid_files()}
        print(json.dumps(pids))
        if pids.get("slurmctld"):
            print(c.run(["sinfo", "-N"], check=False).stdout, end="")
            print(c.run(["squeue"], check=False).stdout, end="")
        return 0 if all(pids.values()) else 1
    elif a.action == "env":
        print(c.shell_env())
    elif a.action == "logs":
        print(c.logs(200))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
