"""minimax_train.tools.spawn, the launcher of the multi-process tests, benchmarks and memory check: results
come back in rank order from a real gloo job, a failing rank's traceback reaches the caller, extra
environment variables reach the children without leaking into the parent, and a hang ends in TimeoutError
with no child left behind."""

from __future__ import annotations

import os
import socket
import time

import pytest

from minimax_train.tools.spawn import free_port, rank_env, run_distributed


def _rank_report(offset):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "env_rank": os.environ["RANK"],
        "sum": t.item(),
        "extra": os.environ.get("SPAWN_TEST_VAR"),
        "pid": os.getpid(),
    }


def _fail_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    return "ok"


def _sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def test_results_in_rank_order_from_one_gloo_job():
    os.environ.pop("SPAWN_TEST_VAR", None)
    got = run_distributed(_rank_report, 2, 10, env={"SPAWN_TEST_VAR": "x"}, timeout=120)
    assert [g["rank"] for g in got] == [0, 1] and [g["env_rank"] for g in got] == ["0", "1"]
    assert all(g["world"] == 2 and g["sum"] == 10 + 11 for g in got)  # the all-reduce ran across the ranks
    assert all(g["extra"] == "x" for g in got) and "SPAWN_TEST_VAR" not in os.environ
    assert len({g["pid"] for g in got} | {os.getpid()}) == 3


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(
        RuntimeError, match=r"rank 1 of 2 failed( \(then rank\(s\) 0\))?:(.|\n)*ValueError: rank one refuses"
    ):
        run_distributed(_fail_on_rank_1, 2, timeout=120)


def test_a_hang_times_out_and_the_children_are_gone():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 5s"):
        run_distributed(_sleep_then_pid, 2, 600, backend=None, timeout=5)
    assert time.monotonic() - t0 < 60
    import multiprocessing

    assert not multiprocessing.active_children()


def test_free_port_and_rank_env():
    port = free_port(exclude=range(0, 1024))
    assert port >= 1024
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free right after
    env = rank_env(2, 4, port)
    assert env == {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "2",
        "LOCAL_WORLD_SIZE": "4",
    }
