"""Stand-in for `python -m minimax_train.train` in launch tests.

Run by torchrun (MINIMAX_ENTRY=<this file>). Reads RANK/WORLD_SIZE/... like the
trainer, takes the Hydra overrides as argv, and writes
``<checkpoint.dir>/rank<R>.json`` (or ``$PROBE_OUT_DIR``).

PROBE_BACKEND: gloo (default) or nccl (GPU LOCAL_RANK per process).
PROBE_MODE:
  allreduce (default)  all-reduce (rank+1) over gloo, write the result
  fail                 exit with $PROBE_EXIT_CODE (default 3)
  preempt              first run (SLURM_RESTART_COUNT=0): write started marker,
                       wait for SIGUSR1/SIGTERM, write a "signalled" marker,
                       exit 0; requeued run: behave like allreduce
"""

import json
import os
import signal
import socket
import sys
import time


def overrides(argv):
    return dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a)


def main() -> int:
    ov = overrides(sys.argv[1:])
    out_dir = os.environ.get("PROBE_OUT_DIR") or ov.get("checkpoint.dir") or "."
    os.makedirs(out_dir, exist_ok=True)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    mode = os.environ.get("PROBE_MODE", "allreduce")
    info = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "node": os.environ.get("SLURMD_NODENAME"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "restart_count": restart,
        "argv": sys.argv[1:],
        "master_addr": os.environ.get("MASTER_ADDR"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "job_id": os.environ.get("SLURM_JOB_ID"),
    }

    def write(name, **extra):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            json.dump({**info, **extra}, f)
        os.replace(path + ".tmp", path)

    if mode == "fail":
        write(f"rank{rank}.fail.json")
        return int(os.environ.get("PROBE_EXIT_CODE", "3"))

    if mode == "preempt" and restart == 0:
        got = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        write(f"rank{rank}.started.json")
        deadline = time.monotonic() + float(os.environ.get("PROBE_WAIT_S", "300"))
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
        if not got:
            return 4  # never signalled
        # the real trainer saves a checkpoint here
        write(f"rank{rank}.signalled.json", signal=signal.Signals(got[0]).name)
        return 0

    import torch
    import torch.distributed as dist

    backend = os.environ.get("PROBE_BACKEND", "gloo")  # nccl: one GPU per process (LOCAL_RANK)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    t = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(t)
    dist.barrier()
    dist.destroy_process_group()
    write(f"rank{rank}.json", sum=t.item(), backend=backend, device=str(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
