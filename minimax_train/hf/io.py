"""Read and write transformers MiniMax checkpoint directories (safetensors only: no pickles)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model import MiniMaxForCausalLM, ModelConfig
from .convert import CheckpointError, hf_to_ours, ours_to_hf_disk

# Keys of a transformers config.json that carry no architecture and that we accept and ignore.
_GENERIC_HF_KEYS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_router_logits",
    "_name_or_path",
    "auto_map",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "id2label",
    "label2id",
    "problem_type",
    "num_labels",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tokenizer_class",
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
    "attn_type_list",
    "postnorm",
    "shared_intermediate_size",
    "rotary_dim",
    "layernorm_full_attention_alpha",
    "layernorm_full_attention_beta",
    "layernorm_linear_attention_alpha",
    "layernorm_linear_attention_beta",
    "layernorm_mlp_alpha",
    "layernorm_mlp_beta",
    "shared_moe_mode",
    "tie_encoder_decoder",
    "torchscript",
    "task_specific_params",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "finetuning_task",
    "pruned_heads",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "is_decoder",
}


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a transformers MiniMax checkpoint directory)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a MiniMax checkpoint: no config.json in it")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if raw.get("model_type") not in ("minimax", "minimax_text_01"):
        raise CheckpointError(
            f"{path} is not a MiniMax checkpoint: config.json has model_type "
            f"'{raw.get('model_type')}' (expected 'minimax')"
        )
    known = _GENERIC_HF_KEYS | set(ModelConfig.__dataclass_fields__)
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise CheckpointError(
            f"{cfg_file}: unknown config key '{unknown[0]}'"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + "; not a MiniMax field this loader understands"
        )
    try:
        return ModelConfig.from_hf_dict(raw)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        hint = (
            " (pytorch_model.bin is not read: unpickling untrusted files is unsafe)"
            if (path / "pytorch_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{path} holds no *.safetensors weights{hint}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{index} names shard {name}, which is missing")
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    return sd


def load_hf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> MiniMaxForCausalLM:
    """A transformers MiniMax checkpoint directory -> our model in one process."""
    path = Path(path)
    cfg = read_hf_config(path)
    sd = hf_to_ours(read_safetensors_dir(path), cfg)
    model = MiniMaxForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return model.to(device=device, dtype=dtype)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain (unsharded) tensors, also for models whose parameters are DTensors (FSDP2/TP)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    if cur:
        shards.append(cur)
    return shards


def save_hf(
    model: MiniMaxForCausalLM,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    state_dict: dict | None = None,
) -> Path:
    """Write a consolidated transformers directory: config.json, generation_config.json, sharded
    safetensors + index, tokenizer files. Written to a temp dir and renamed, so a crash never leaves a
    half-written export under `path`."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another --out or pass overwrite")
    cfg: ModelConfig = model.config
    sd = state_dict if state_dict is not None else full_state_dict(model)
    sd = {k: v.to(dtype) if dtype is not None else v for k, v in sd.items()}
    disk = ours_to_hf_disk(sd, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards = _shards(disk, max_shard_bytes)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k], total = fname, total + v.numel() * v.element_size()
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        hf_cfg = cfg.to_hf_dict()
        some = next(iter(sd.values()))
        hf_cfg["dtype"] = str(some.dtype).removeprefix("torch.")
        if tokenizer is not None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if hf_cfg.get(key) is None and getattr(tokenizer, key, None) is not None:
                    hf_cfg[key] = getattr(tokenizer, key)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
