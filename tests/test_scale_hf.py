"""HF import and export at scale on CPU: a transformers-format MiniMax checkpoint of SCALE_MB MiB (default
512; MINIMAX_SCALE_MB=1536 for the 1.5 GB run) written by transformers itself is imported into tp=2 x ep=2
(4 gloo ranks) reading only each rank's slices: every rank's anonymous RSS grows by at most half the model
while building (the mapped safetensors pages it touches are shared page cache, reported beside it), and the logits equal transformers' (1e-5). The checkpoint those ranks save exports (streaming)
with a peak RSS below 40% of the model; transformers loads the export with no missing or unexpected keys,
and every tensor is bit-identical to the original checkpoint's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_scale_memory import LAYER_BYTES, SCALE_MB
from test_stream_export import _export_rss, save_checkpoint
from util_models import make_config, make_model

from minimax_train.tools.memcheck import MALLOC_ENV
from minimax_train.tools.spawn import run_distributed

transformers = pytest.importorskip("transformers")
PARALLEL = dict(tp=2, ep=2, sequence_parallel=True)
TOL = 1e-5


def _hf_config():
    from hf_oracle import tiny_hf_config

    layers = max(2, 2 * round(SCALE_MB * 2**20 / LAYER_BYTES / 2))
    return tiny_hf_config(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=1024,
        num_local_experts=16,
        num_attention_heads=4,
        head_dim=64,
        num_hidden_layers=layers,
        layer_types=["linear_attention", "full_attention"] * (layers // 2),
        block_size=16,
    )


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _write_hf(path: str) -> torch.Tensor:
    """transformers' model with random weights, saved by save_pretrained; its logits on _ids()."""
    from hf_oracle import random_hf_model

    model = random_hf_model(_hf_config())
    for p in model.parameters():
        p.data.mul_(0.1)  # keep the deep random model's logits moderate
    model.save_pretrained(path)
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _import_rank(hf_dir: str, ckpt_root: str) -> dict:
    import torch.distributed as dist
    from util_memory import anon_rss_growth, rss_growth
    from util_models import build_parallel

    from minimax_train.hf import SafetensorsSource, read_hf_config

    build_parallel(make_config(), **PARALLEL)  # warm-up: code, gloo buffers
    cfg = read_hf_config(hf_dir)
    build = lambda: build_parallel(cfg, source=SafetensorsSource(hf_dir, cfg), **PARALLEL)  # noqa: E731
    ((model, mesh), anon), total = rss_growth(lambda: anon_rss_growth(build))
    with torch.no_grad():
        logits = model(_ids(), return_logits=True).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    _save_layout_checkpoint(model, mesh, Path(ckpt_root))
    return {"rank": dist.get_rank(), "build_rss_growth": anon, "build_rss_total": total, "logits": logits}


def _save_layout_checkpoint(model, mesh, root: Path) -> None:
    """The model part of a trainer checkpoint, written by every rank from its shards (DCP, the keys and
    logical shapes of every layout), and its config.yaml: what the export reads. (No optimiser: torch's
    get_state_dict initialises an un-stepped AdamW by a fake step, which crashed here for tp=2 x ep=2.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from minimax_train.conf_tree import compose_job
    from minimax_train.config import job_to_yaml
    from minimax_train.parallel.expert_parallel import standard_gate_up
    from minimax_train.train.checkpoint import CONFIG

    with standard_gate_up({"model": get_model_state_dict(model)}) as state:
        dcp.save(state, checkpoint_id=str(root))
    if mesh.is_main:
        job = compose_job("data.tokenizer=byte")
        job.model = model.config
        (root / CONFIG).write_text(job_to_yaml(job))
    mesh.barrier()


def test_hf_import_and_export_at_scale(tmp_path):
    from safetensors import safe_open

    from minimax_train.hf.io import safetensors_index

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    (ref_logits,) = run_distributed(_write_hf, 1, str(hf_dir), backend=None, timeout=600)
    index = safetensors_index(hf_dir)
    size = sum((hf_dir / f).stat().st_size for f in set(index.values()))
    got = run_distributed(_import_rank, 4, str(hf_dir), str(ckpt), timeout=900, env=MALLOC_ENV)
    growth = [r["build_rss_growth"] >> 20 for r in got]
    total = [r["build_rss_total"] >> 20 for r in got]  # + the mapped pages of the safetensors files read
    for r in got:
        assert r["build_rss_growth"] <= 0.5 * size, (r["rank"], growth)
        err = (r["logits"] - ref_logits).abs().max().item()
        assert err <= TOL * ref_logits.abs().max().item(), (r["rank"], err)

    small = save_checkpoint(make_model(make_config()), tmp_path / "small")
    step = ckpt
    (export_growth,) = run_distributed(
        _export_rss, 1, str(small), str(step), str(tmp_path / "out"), backend=None, env=MALLOC_ENV, timeout=600
    )
    print(
        f"HF checkpoint {size / 2**20:.0f} MiB; import anonymous RSS growth per rank (MiB) {growth} "
        f"(with mapped file pages {total}); "
        f"export RSS growth {export_growth / 2**20:.0f} MiB"
    )
    assert export_growth < 0.4 * size

    out = tmp_path / "out"
    loaded, info = transformers.MiniMaxForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    del loaded
    exported = safetensors_index(out)
    original = {k: v for k, v in index.items()}
    assert set(exported) >= {k for k in original if not k.rsplit(".", 1)[-1].endswith("decay")}
    for k, f in original.items():
        if k not in exported:
            continue
        with safe_open(str(hf_dir / f), "pt") as a, safe_open(str(out / exported[k]), "pt") as b:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
