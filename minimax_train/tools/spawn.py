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
from queue import Empty
from typing import Any

LOCALHOST = "127.0.0.1"
FAILURE_SETTLE_S = 5.0  # after a rank fails, how long to wait for the others' reports


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
    failed_at = None
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
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                failed_at = time.time()  # before the teardown, which then breaks the peers' collectives
                raise
        # plain pickle (tensors copied into the bytes): no shared-memory handles that outlive this process
        queue.put((rank, True, pickle.dumps(result), None))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc(), failed_at or time.time()))
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
    results: dict[int, bytes] = {}
    errors: dict[int, tuple[float, str]] = {}  # rank -> (when it failed, its traceback)
    dead_since: dict[int, float] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    settle = None  # after the first failure, how long the other ranks' reports may still take
    try:
        while len(results) + len(errors) < world_size:
            now = time.monotonic()
            if settle is not None and now > settle:
                break  # the rest hang in collectives with the failed rank: stop them
            if deadline is not None and now > deadline:
                raise TimeoutError(
                    f"run_distributed: {world_size - len(results) - len(errors)} rank(s) did not "
                    f"finish within {timeout:.0f}s (finished: {sorted(results)}, failed: {sorted(errors)})"
                )
            try:
                rank, ok, value, failed_at = queue.get(timeout=1.0)
            except Empty:  # a rank that died without a report (killed, crashed) fails after a grace second
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in results and r not in errors:
                        if now - dead_since.setdefault(r, now) > 1.0:
                            errors[r] = (time.time(), f"rank {r} exited with code {p.exitcode} without a result")
                            settle = settle or time.monotonic() + FAILURE_SETTLE_S
                continue
            if ok:
                results[rank] = value
            else:
                errors[rank] = (failed_at, value)
                settle = settle or time.monotonic() + FAILURE_SETTLE_S
    finally:
        clean = len(results) == world_size  # the ranks are exiting: let them; else end them now
        for p in procs:
            p.join(timeout=10 if clean else 0)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        # the first rank to fail is the cause; the others' collectives broke because of it
        first = min(errors, key=lambda r: errors[r][0])
        later = sorted(set(errors) - {first})
        note = f" (then rank(s) {', '.join(map(str, later))})" if later else ""
        raise RuntimeError(f"rank {first} of {world_size} failed{note}:\n{errors[first][1]}")
    return [pickle.loads(results[r]) for r in range(world_size)]
