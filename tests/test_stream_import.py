"""ckpt import-hf streams (hf/stream_import.py): it writes the checkpoint that a one-process save of the whole
loaded model writes (load_hf + build_optimizer + CheckpointManager.save: every key, tensor, param group and
the meta, bit for bit) from transformers' per-expert files, the fused in-memory layout and sharded bf16
files, refuses NaN weights, and its peak RSS while importing stays far below the model's size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_stream_export import BIG
from test_tools_ckpt import _assert_same_state
from util_models import make_config, make_model

from minimax_train.tools import ckpt as C
from minimax_train.tools.memcheck import MALLOC_ENV
from minimax_train.tools.spawn import run_distributed

transformers = pytest.importorskip("transformers")
OVERRIDES = ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=1"]


def whole_model_import(hf_dir: Path, out: Path, overrides: list[str]) -> Path:
    """The import as it was before streaming: the whole model loaded (load_hf), saved with a fresh AdamW by
    the trainer's CheckpointManager in one process."""
    from minimax_train.conf_tree import compose_job
    from minimax_train.config import job_to_yaml
    from minimax_train.data import build_loader, load_tokenizer
    from minimax_train.hf import load_hf, read_hf_config
    from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh
    from minimax_train.train.checkpoint import CheckpointManager, rng_state
    from minimax_train.train.optim import build_optimizer

    job = compose_job(*overrides)
    job.model = read_hf_config(hf_dir)
    job.checkpoint.init_from_hf = None
    t = job.train
    loader = build_loader(job.data, load_tokenizer(job.data), seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                          dp_rank=0, dp_size=1, seed=t.seed, split="train")  # fmt: skip
    model = load_hf(hf_dir, dtype=torch.float32)
    optimizer, _ = build_optimizer(model, job.optim, device=torch.device("cpu"), sharded=False)
    mesh = ParallelMesh(ParallelConfig(), world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    manager = CheckpointManager(out, mesh)
    manager.prepare()
    meta = {"step": 0, "tokens": 0, "skipped_steps": 0, "consecutive_nonfinite": 0, "wandb_run_id": None,
            "data": loader.state_dict(), "dp_size": 1, "imported_from": str(hf_dir.absolute())}  # fmt: skip
    return manager.save(0, model, optimizer, meta, {"rng": rng_state()}, job_to_yaml(job))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    from minimax_train.train.checkpoint import read_meta

    _assert_same_state(a, b)
    ma, mb = read_meta(a), read_meta(b)
    assert ma["meta"] == mb["meta"] and ma["world_size"] == mb["world_size"] and ma["dp_size"] == mb["dp_size"]
    assert ma["ranks"][0].keys() == mb["ranks"][0].keys()
    assert (a / "config.yaml").read_text() == (b / "config.yaml").read_text()


def _hf_model():
    from hf_oracle import random_hf_model, tiny_hf_config

    return random_hf_model(tiny_hf_config(vocab_size=4096, intermediate_size=48), seed=5)


def _write(kind: str, path: Path) -> None:
    from safetensors.torch import save_file

    from minimax_train.hf import save_hf
    from minimax_train.hf.io import load_hf

    hf = _hf_model()
    if kind == "per_expert":  # transformers' own save_pretrained: block_sparse_moe.experts.N.w1/w2/w3
        hf.save_pretrained(path)
    elif kind == "fused":  # the in-memory names: mlp.experts.gate_up_proj / down_proj
        path.mkdir()
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(hf.config.to_json_string())
    else:  # bf16, split over several files (experts of one layer in different files)
        hf.save_pretrained(path / "src")
        save_hf(load_hf(path / "src"), path / "bf16", dtype=torch.bfloat16, max_shard_bytes=200_000)


@pytest.mark.parametrize("kind", ["per_expert", "fused", "bf16_sharded"])
def test_import_hf_is_the_whole_model_save_bit_for_bit(tmp_path, kind):
    _write(kind, tmp_path / "hf")
    hf_dir = tmp_path / "hf" / "bf16" if kind == "bf16_sharded" else tmp_path / "hf"
    ref = whole_model_import(hf_dir, tmp_path / "ref", OVERRIDES)
    got = C.import_hf(hf_dir, tmp_path / "got", OVERRIDES, max_file_bytes=100_000)
    assert got.name == ref.name == "step_00000000"
    assert len(list(got.glob("*.distcp"))) > 3  # files of about max_file_bytes
    assert_same_checkpoint(got, ref)
    if kind == "per_expert":  # the imported weights are transformers' tensors
        from minimax_train.export import load_checkpoint_model

        model, _, _ = load_checkpoint_model(got)
        hf_sd, ours = _hf_model().state_dict(), model.state_dict()
        assert all(torch.equal(ours[k], hf_sd[k]) for k in ours)


def test_import_hf_refuses_nan_and_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    _write("per_expert", tmp_path / "hf")
    f = next((tmp_path / "hf").glob("*.safetensors"))
    sd = load_file(f)
    sd["model.layers.1.self_attn.o_proj.weight"][2, 3] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    assert C.main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--", *OVERRIDES]) == 2
    assert not list((tmp_path / "out").iterdir())  # no step dir, no .tmp


def _import_rss(warm_hf: str, hf: str, out: str) -> tuple[int, int]:
    """(peak RSS growth, peak anonymous RSS growth) of importing `hf`, after importing the small `warm_hf` in
    the same process (lazily imported code and one-time allocations are not the import's memory)."""
    from util_memory import anon_rss_growth, rss_growth

    from minimax_train.tools.ckpt import import_hf

    for src, dest in ((warm_hf, out + ".warm"), (hf, out)):
        (_, anon), total = rss_growth(lambda: anon_rss_growth(lambda: import_hf(src, dest, OVERRIDES)))
    return total, anon


def test_import_hf_peak_memory_is_a_fraction_of_the_model(tmp_path):
    from minimax_train.hf import save_hf

    model = make_model(make_config(**BIG))
    size = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    save_hf(model, tmp_path / "hf")  # per-expert files
    save_hf(make_model(make_config(vocab_size=4096)), tmp_path / "small")
    del model
    args = str(tmp_path / "small"), str(tmp_path / "hf"), str(tmp_path / "ckpt")
    ((total, anon),) = run_distributed(_import_rss, 1, *args, backend=None, env=MALLOC_ENV, timeout=600)
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "step_00000000").glob("*.distcp"))
    print(
        f"model {size / 2**20:.0f} MiB (checkpoint with Adam moments {written / 2**20:.0f} MiB), largest tensor "
        f"{largest / 2**20:.1f} MiB, import RSS +{total / 2**20:.0f} MiB (anonymous +{anon / 2**20:.0f} MiB)"
    )
    assert written > 2.9 * size
    # about one tensor read (its copy and the file pages it came from), not the model
    assert total < 0.4 * size
    assert total < 3 * largest + (32 << 20)
