"""Run a function in N fresh processes that form a torch.distributed job (gloo on CPU).

    from util_dist import run_distributed
    results = run_distributed(fn, 2, arg1, arg2)   # fn(*args) runs on every rank; returns [rank0, rank1]

Each child gets the torchrun environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and, with init=True (default), an initialised gloo default process group that is
destroyed afterwards if fn left it alive. `fn` must be importable (a module-level function) and its
return value picklable. A failure on any rank raises RuntimeError with that rank's traceback; a hang
is killed after `timeout` seconds. Reusable by the parallel suites (tp/cp/ep equivalence tests)."""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, init, threads, env, queue, args, kwargs):
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
        }
    )
    os.environ.update(env or {})
    try:
        import torch
        import torch.distributed as dist

        if threads:
            torch.set_num_threads(threads)
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(*args, **kwargs)
        if dist.is_initialized():
            dist.destroy_process_group()
        # plain pickle (tensors copied into the bytes): no shared-memory handles that outlive this process
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 300.0,
    init: bool = True,
    threads: int | None = 1,
    env: dict[str, str] | None = None,
    **kwargs,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child, args=(fn, r, world_size, port, init, threads, env, queue, args, kwargs), daemon=False
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
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
