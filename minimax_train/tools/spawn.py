"""Run a function in N fresh local processes that form one torch.distributed job: the launcher of the
multi-process tests, of the benchmarks' runs without torchrun and of the planner's memory check.

    from minimax_train.tools.spawn import run_distributed
    results = run_distributed(fn, 2, arg1, arg2)   # fn(*args) runs on every rank; returns [rank0, rank1]

Each child gets the torchrun environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and, unless backend=None, an initialised default process group (gloo, or nccl on GPU
`rank`), torn down afterwards by mesh.process_group_teardown if fn left it alive. `fn` must be importable
(a module-level function) and its return value picklable. A failure on any rank raises RuntimeError with
that rank's traceback; a hang is killed after `timeout` seconds."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST, exclude: Iterable[int] = ()) -> int:
    """A TCP port the OS reports free on `host` ("" = every address) right now, not one of `exclude`."""
    exclude = set(exclude)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


def rank_env(rank: int, world_size: int, port: int, host: str = LOCALHOST) -> dict[str, str]:
    """The variables torchrun gives rank `rank` of a one-node job of `world_size` processes."""
    return {
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _child(fn, rank, world, port, backend, threads, queue, args, kwargs):
    os.environ.update(rank_env(rank, world, port))
    try:
        import torch
        import torch.distributed as dist

        from minimax_train.parallel.mesh import process_group_teardown

        if threads:
            torch.set_num_threads(threads)
        device = None
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        elif backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world)
        with process_group_teardown(device):
            result = fn(*args, **kwargs)
        # plain pickle (tensors copied into the bytes): no shared-memory handles that outlive this process
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
        return
    # A clean rank ends without interpreter finalization: gloo's worker threads can still hold tensors then,
    # and freeing them there aborts the process ("terminate called without an active exception").
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float | None = 300.0,
    backend: str | None = "gloo",
    threads: int | None = 1,
    env: dict[str, str] | None = None,
    **kwargs,
) -> list[Any]:
    """fn(*args, **kwargs) on `world_size` fresh processes; their return values, rank order.

    backend: gloo | nccl | None (fn initialises torch.distributed itself from the environment);
    threads: torch.set_num_threads in each child (None: torch's default); env: extra environment
    variables, in place from the children's start (so that glibc's malloc tunables apply, too);
    timeout: seconds for the whole job (None: no limit)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, backend, threads, queue, args, kwargs))
        for r in range(world_size)
    ]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # inherited by the children
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_distributed: {world_size - len(results) - len(errors)} rank(s) did not "
                    f"finish within {timeout:.0f}s (finished: {sorted(results)}, failed: {sorted(errors)})"
                )
            try:
                rank, ok, value = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in results and r not in errors
                ]
                if dead:
                    # give a dying rank's own report a moment to arrive
                    time.sleep(0.5)
                    while not queue.empty():
                        rank, ok, value = queue.get()
                        (results if ok else errors)[rank] = value
                    dead = [r for r in dead if r not in results and r not in errors]
                    for r in dead:
                        errors[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
                    if errors:
                        break
                continue
            if ok:
                results[rank] = value
            else:
                errors[rank] = value
                break  # the others will hang in collectives: stop them
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [pickle.loads(results[r]) for r in range(world_size)]
