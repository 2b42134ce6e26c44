"""The streaming export (hf/stream_export.py, behind python -m minimax_train.export and ckpt export-hf)
writes exactly the files save_hf writes from the whole model (names, shard split, index, bytes), in fp32
and bf16, refuses a checkpoint that does not fit its config or holds NaN, and keeps its peak memory far
below the model's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from util_models import make_config, make_model

from minimax_train.tools.memcheck import MALLOC_ENV
from minimax_train.tools.spawn import run_distributed


def save_checkpoint(model, root: Path) -> Path:
    """`model` as the trainer's step-0 checkpoint (DCP model + empty AdamW state, config.yaml) in `root`."""
    from minimax_train.conf_tree import compose_job
    from minimax_train.config import job_to_yaml
    from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh
    from minimax_train.train.checkpoint import CheckpointManager

    job = compose_job("data.tokenizer=byte")
    job.model = model.config
    mesh = ParallelMesh(ParallelConfig(), world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    manager = CheckpointManager(root, mesh)
    manager.prepare()
    opt = torch.optim.AdamW(model.parameters())
    return manager.save(0, model, opt, {"step": 0}, {}, job_to_yaml(job))


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = make_model(make_config())
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_stream_export_writes_the_files_save_hf_writes(ckpt, tmp_path, dtype):
    from minimax_train.hf import save_hf
    from minimax_train.hf.stream_export import export_checkpoint

    model, step = ckpt
    kw = dict(dtype=dtype, max_shard_bytes=300_000)  # several shards; experts split across files
    ref = save_hf(model, tmp_path / "ref", **kw)
    got = export_checkpoint(step, tmp_path / "got", model.config, **kw)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert len(list(got.glob("*.safetensors"))) > 2
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert json.loads((got / name).read_text()) == json.loads((ref / name).read_text()), name
    a, b = read_dir(got), read_dir(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_export_command_streams_and_loads_in_transformers(ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minimax_train.export import main

    model, step = ckpt
    assert main(["--checkpoint", str(step.parent), "--out", str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    hf, info = transformers.MiniMaxForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_sd = hf.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(hf_sd[k], v), k


def test_stream_export_refuses_nan_and_a_foreign_config(ckpt, tmp_path):
    from minimax_train.hf.convert import CheckpointError
    from minimax_train.hf.stream_export import export_checkpoint

    model, _ = ckpt
    with pytest.raises(CheckpointError, match="expects"):
        export_checkpoint(ckpt[1], tmp_path / "a", make_config(hidden_size=32))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from minimax_train.parallel.expert_parallel import standard_gate_up

    bad = make_model(make_config())
    step = save_checkpoint(bad, tmp_path / "nan")  # the trainer refuses to save NaN: write it over by hand
    with torch.no_grad():
        bad.model.layers[1].self_attn.o_proj.weight[3, 4] = float("nan")
    for f in [*step.glob("*.distcp"), step / ".metadata"]:
        f.unlink()
    with standard_gate_up({"model": get_model_state_dict(bad)}) as state:
        dcp.save(state, checkpoint_id=str(step), no_dist=True)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.o_proj.weight holds NaN"):
        export_checkpoint(step, tmp_path / "b", bad.config)
    assert not (tmp_path / "b").exists()  # nothing half-written


# ~250 MB fp32 over 8 layers: the largest tensor (one layer's fused gate/up) is ~5% of the model
BIG = dict(hidden_size=256, intermediate_size=1024, num_local_experts=16, num_hidden_layers=8, vocab_size=4096)


def _export_rss(warm_up: str, step: str, out: str) -> int:
    """Peak RSS growth of exporting `step`, after exporting the small checkpoint `warm_up` in the same process
    (lazily imported code and one-time allocations are not the export's memory)."""
    from util_memory import rss_growth

    from minimax_train.config import load_job_yaml
    from minimax_train.hf.stream_export import export_checkpoint

    for ckpt, dest in ((warm_up, out + ".warm"), (step, out)):
        cfg = load_job_yaml(Path(ckpt) / "config.yaml").model
        _, grew = rss_growth(lambda: export_checkpoint(ckpt, dest, cfg, max_shard_bytes=1 << 30))
    return grew


def test_stream_export_peak_memory_is_a_fraction_of_the_model(ckpt, tmp_path):
    model = make_model(make_config(**BIG))
    size = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    step = save_checkpoint(model, tmp_path / "ckpt")
    del model
    args = str(ckpt[1]), str(step), str(tmp_path / "hf")
    (grew,) = run_distributed(_export_rss, 1, *args, backend=None, env=MALLOC_ENV)
    print(f"model {size / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, export RSS +{grew / 2**20:.0f} MiB")
    assert grew < 0.4 * size
    # about one tensor (DCP reads a chunk, then copies it into the tensor), not the model, though one
    # 1 GiB output shard holds it all
    assert grew < 3 * largest + (32 << 20)


def test_stream_export_of_tied_embeddings_is_save_hfs(tmp_path):
    from minimax_train.hf import save_hf
    from minimax_train.hf.stream_export import export_checkpoint

    model = make_model(make_config(tie_word_embeddings=True, num_key_value_heads=1))
    step = save_checkpoint(model, tmp_path / "ckpt")
    ref, got = (
        read_dir(save_hf(model, tmp_path / "ref")),
        read_dir(export_checkpoint(step, tmp_path / "got", model.config)),
    )
    assert got.keys() == ref.keys() and "lm_head.weight" not in got
    assert all(torch.equal(got[k], ref[k]) for k in ref)
