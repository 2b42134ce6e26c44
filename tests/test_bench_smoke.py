"""CPU smoke tests of the benchmark scripts (tools/bench_kernels.py, tools/bench_train.py): they run end to end in
their --device cpu modes, print their tables, report the GPU-only paths as skipped, and write strict JSON with
finite numbers. Speed itself is never asserted (tests never assert timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from util_train import REPO

TOOLS = REPO / "tools"


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load_tool(name: str):
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_flops_match_the_model_counter():
    """The kernel benchmark's attention FLOPs are the attention terms of model/flops.py: adding heads to a
    one-layer model adds exactly the projections plus the kernel's FLOPs."""
    from minimax_train.model.config import FULL, LINEAR, ModelConfig
    from minimax_train.model.flops import forward_flops_per_token

    bk = _load_tool("bench_kernel_cases")
    h, d, T = 256, 32, 4096
    for kind in (LINEAR, FULL):

        def f(n):
            cfg = ModelConfig(
                hidden_size=h,
                num_attention_heads=n,
                num_key_value_heads=2,
                head_dim=d,
                num_hidden_layers=1,
                layer_types=[kind],
            )
            return forward_flops_per_token(cfg, T)

        n = 4
        if kind == LINEAR:
            proj, core = 2.0 * h * 5 * n * d, bk.lightning_flops(T, n, d) / T
        else:
            proj, core = 2.0 * h * 2 * n * d, bk.softmax_flops([T], n, d) / T
        assert f(2 * n) - f(n) == pytest.approx(proj + core, rel=1e-12)


@pytest.mark.slow
def test_bench_kernels_cpu_tiny(tmp_path):
    out = tmp_path / "kernels.json"
    p = _run([str(TOOLS / "bench_kernels.py"), "--device", "cpu", "--tiny", "--budget", "0.05", "--out", str(out)])
    for title in ("### Lightning attention", "### Softmax attention", "### Experts"):
        assert title in p.stdout, p.stdout
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["rows"]
    assert _finite(meta["copy_tb_per_s"]) and meta["copy_tb_per_s"] > 0
    assert _finite(meta["matmul_tflops"]) and meta["matmul_tflops"] > 0
    ok = {(r["section"], r["impl"]) for r in rows if r["status"] == "ok"}
    assert {
        ("lightning", "torch"),
        ("softmax", "torch-docs"),
        ("softmax", "sdpa-math"),
        ("experts", "ours"),
        ("experts", "loop"),
        ("experts", "dense"),
    } <= ok, ok
    for r in rows:
        if r["status"] == "ok":
            for k in ("ms", "min_ms", "tflops", "floor_flops_ms", "x_floor"):
                assert _finite(r[k]) and r[k] > 0, (k, r)
            if r["section"] != "experts":
                assert _finite(r["tb_per_s"]) and _finite(r["floor_bytes_ms"]), r
    # the CUDA-only paths are reported, not crashed on
    skipped = {(r["section"], r["impl"]) for r in rows if r["status"] == "skipped"}
    assert {("lightning", "ours"), ("lightning", "fla"), ("softmax", "flex-docs"), ("softmax", "flex-1doc")} <= skipped
    assert all(r["note"] for r in rows if r["status"] != "ok")
    assert not [r for r in rows if r["status"] == "failed"], [r for r in rows if r["status"] == "failed"]


def _bench_train_cpu_tiny(tmp_path, impls: str):
    """bench_train.py at tiny size on CPU, 3 steps (1 warm-up), every impl ok with finite positive numbers:
    (the model config, its all-softmax twin that megatron and titan train, the results by impl)."""
    from minimax_train.model.config import FULL, ModelConfig

    out = tmp_path / "train.json"
    p = _run(
        [
            str(TOOLS / "bench_train.py"),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--seq-len",
            "128",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--peak-tflops",
            "1",
            "--impls",
            impls,
            "--workdir",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ]
    )
    assert "| impl | tokens/s | TFLOP/s/GPU | MFU | peak mem GB | ratio ours/impl | status |" in p.stdout, p.stdout
    assert "reproduce: python" in p.stdout
    data = json.loads(out.read_text())
    res = {r["impl"]: r for r in data["results"]}
    assert set(res) == set(impls.split(","))
    for impl, r in res.items():
        assert r["status"] == "ok", (impl, r.get("reason"))
        for k in ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb", "flops_per_token", "loss_last"):
            assert _finite(r[k]) and r[k] > 0, (impl, k, r[k])
        assert r["timed_steps"] == 2
    cfg = ModelConfig(**data["meta"]["model"])
    soft = ModelConfig(**{**data["meta"]["model"], "layer_types": [FULL] * cfg.num_hidden_layers})
    return cfg, soft, res


@pytest.mark.slow
def test_bench_train_cpu_tiny(tmp_path):
    have_megatron = importlib.util.find_spec("megatron") is not None
    cfg, soft, res = _bench_train_cpu_tiny(tmp_path, "ours,hf,megatron" if have_megatron else "ours,hf")
    # one FLOP counter: ours and transformers train the same hybrid model, megatron the all-softmax one
    from minimax_train.model.flops import train_flops_per_token

    assert res["ours"]["flops_per_token"] == pytest.approx(train_flops_per_token(cfg, 128))
    assert res["hf"]["flops_per_token"] == res["ours"]["flops_per_token"]
    if "megatron" in res:
        assert res["megatron"]["flops_per_token"] == pytest.approx(train_flops_per_token(soft, 128))


def test_bench_train_titan_cpu_tiny(tmp_path):
    """TorchTitan's Qwen3 MoE peer trains the all-softmax model: its parameter count is the ModelConfig's and its
    FLOPs the all-softmax counter's (CPU: the sdpa backend, flex has no backward there)."""
    pytest.importorskip("torchtitan")
    from minimax_train.model.flops import count_params, train_flops_per_token

    _, soft, res = _bench_train_cpu_tiny(tmp_path, "titan")
    titan = res["titan"]
    assert titan["params"] == titan["params_expected"] == count_params(soft).total
    assert titan["flops_per_token"] == pytest.approx(train_flops_per_token(soft, 128))
    assert titan["attn_backend"] == "sdpa"


def test_bench_layouts_cpu_tiny(tmp_path):
    """bench_layouts runs the trainer per layout (torchrun, gloo): the table prints, the tp=2 run's losses and
    gradient norms equal the one-process run's (fp32), and the planner's estimate is attached to each row."""
    out = tmp_path / "layouts.json"
    p = _run(
        [
            str(TOOLS / "bench_layouts.py"),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--seq-len",
            "128",
            "--rows",
            "4",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--layout",
            "one:1:",
            "--layout",
            "tp2:2:tp=2",
            "--workdir",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ]
    )
    assert "| layout | GPUs | ktok/s | ktok/s/GPU | scaling eff |" in p.stdout, p.stdout
    res = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert res["one"]["status"] == res["tp2"]["status"] == "ok"
    for key in ("losses", "grad_norms"):
        assert res["tp2"][key] == pytest.approx(res["one"][key], rel=1e-5)
    assert res["tp2"]["layout"].startswith("tp2 cp1 dp1") and _finite(res["tp2"]["estimate_gb"])


def test_bench_data_index_cpu_tiny(tmp_path):
    """The data-order benchmark builds Megatron's three indices (int32 documents, int32 sample pairs, uint32
    shuffle) and reads one span through our loader, both over the same synthetic corpus."""
    out = tmp_path / "index.json"
    _run(
        [
            "tools/bench_data_index.py",
            "--tokens",
            "3e5",
            "--seq-len",
            "256",
            "--span-tokens",
            "65536",
            "--json",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    docs, tokens = res["corpus"]["documents"], res["corpus"]["tokens"]
    samples = (tokens - 1) // 256  # Megatron drops the last partial sample; each sample has seq_len + 1 tokens
    assert res["megatron"]["bytes"] == {
        "document_index": 4 * docs,
        "sample_index": 8 * (samples + 1),
        "shuffle_index": 4 * samples,
    }
    assert res["ours"]["span"]["rows"] == 256 and res["ours"]["document_permutation"]["bytes"] == 8 * docs
    assert res["ours"]["span"]["held_bytes"] >= 4 * 65536  # the span's tokens, int32
    assert all(_finite(v) for v in res["per_1b_tokens"].values())
