"""State-dict re-layout between our model and transformers' MiniMax checkpoints.

Our names equal transformers v5's in-memory names. On disk (save_pretrained default and the released
checkpoints) the MoE is stored per expert under `block_sparse_moe`: gate.weight, experts.{e}.w1/w3/w2."""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..model.config import LINEAR, ModelConfig
from ..ops.lightning import lightning_slopes

# transformers' persistent lightning buffers: recomputed on load, never stored by our export.
LIGHTNING_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our (= transformers in-memory) state dict with its shape."""
    h, n, d, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    e, i, v = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for li, kind in enumerate(cfg.resolved_layer_types()):
        p = f"model.layers.{li}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate.weight"] = (e, h)
        shapes[p + "mlp.experts.gate_up_proj"] = (e, 2 * i, h)
        shapes[p + "mlp.experts.down_proj"] = (e, h, i)
        if kind == LINEAR:
            shapes[p + "self_attn.qkv_proj.weight"] = (3 * n * d, h)
            shapes[p + "self_attn.output_gate.weight"] = (n * d, h)
            shapes[p + "self_attn.out_proj.weight"] = (h, n * d)
            shapes[p + "self_attn.norm.weight"] = (n * d,)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (n * d, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv * d, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv * d, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, n * d)
    return shapes


def _our_name_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a transformers checkpoint (per-expert on-disk layout, fused in-memory layout, or a
    mix) as our state dict would have them; raises CheckpointError naming a missing or unexpected tensor."""
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if name.rsplit(".", 1)[-1] in LIGHTNING_BUFFERS:
            continue
        m = _EXPERT_KEY.match(name)
        if m:
            experts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = tuple(shape)
        elif ".block_sparse_moe.gate.weight" in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = tuple(shape)
        else:
            out[name] = tuple(shape)
    num_e = cfg.num_local_experts
    for li in sorted({li for li, _ in experts}):
        for e in range(num_e):
            if (li, e) not in experts:
                raise CheckpointError(
                    f"missing tensor model.layers.{li}.block_sparse_moe.experts.{e}.w1.weight "
                    f"(config has num_local_experts={num_e})"
                )
            for w in ("w1", "w2", "w3"):
                if w not in experts[(li, e)]:
                    raise CheckpointError(f"missing tensor model.layers.{li}.block_sparse_moe.experts.{e}.{w}.weight")
        extra = sorted(e for (l2, e) in experts if l2 == li and e >= num_e)
        if extra:
            raise CheckpointError(
                f"unexpected tensor model.layers.{li}.block_sparse_moe.experts.{extra[0]}.w1.weight "
                f"(config has num_local_experts={num_e})"
            )
        per = [experts[(li, e)] for e in range(num_e)]
        for w in ("w1", "w2", "w3"):
            found = {p[w] for p in per}
            if len(found) > 1:
                raise CheckpointError(f"layer {li}: experts' {w} weights disagree in shape: {sorted(found)}")
        i, h = cfg.intermediate_size, cfg.hidden_size
        for w, want in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            if per[0][w] != want:
                raise CheckpointError(
                    f"tensor model.layers.{li}.block_sparse_moe.experts.0.{w}.weight has shape {per[0][w]}, "
                    f"config expects {want}"
                )
        out[f"model.layers.{li}.mlp.experts.gate_up_proj"] = (num_e, 2 * i, h)
        out[f"model.layers.{li}.mlp.experts.down_proj"] = (num_e, h, i)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def check_checkpoint_layout(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    """Every tensor the config needs is in the checkpoint with its shape, and nothing else (names and shapes
    only: nothing is read)."""
    _check_shapes(_our_name_shapes(shapes, cfg), cfg)


def hf_to_ours(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole checkpoint in memory -> our state dict (tools and tests; training reads by slices through
    hf/io.py's SafetensorsSource). Accepts the per-expert on-disk layout, the fused layout, or a mix."""
    check_checkpoint_layout({k: tuple(v.shape) for k, v in hf.items()}, cfg)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in hf.items():
        if name.rsplit(".", 1)[-1] in LIGHTNING_BUFFERS:
            continue
        m = _EXPERT_KEY.match(name)
        if m:
            experts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = t
        elif ".block_sparse_moe.gate.weight" in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
        else:
            out[name] = t
    for li in sorted({li for li, _ in experts}):
        per = [experts[(li, e)] for e in range(cfg.num_local_experts)]
        out[f"model.layers.{li}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([p["w1"], p["w3"]]) for p in per])
        out[f"model.layers.{li}.mlp.experts.down_proj"] = torch.stack([p["w2"] for p in per])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _check_shapes(found: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in found]
    if missing:
        raise CheckpointError(
            f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = [k for k in found if k not in want]
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]} for this config"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for k, shape in want.items():
        if tuple(found[k]) != shape:
            raise CheckpointError(f"tensor {k} has shape {tuple(found[k])}, config expects {shape}")


def validate_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    _check_shapes({k: tuple(v.shape) for k, v in sd.items()}, cfg)


def lightning_buffers(cfg: ModelConfig, layer_idx: int) -> dict[str, torch.Tensor]:
    """transformers' persistent decay buffers of one lightning layer, computed exactly as its
    MiniMaxLightningAttention.decay_factors does (written so its loader reports nothing missing)."""
    slope = lightning_slopes(cfg.num_attention_heads, layer_idx, cfg.num_hidden_layers, legacy=cfg.legacy_slopes)[
        :, None, None
    ]
    rng = torch.arange(cfg.block_size) + 1
    diag = slope * (rng[:, None] - rng[None, :])[None, None, :, :]
    return {
        "slope_rate": slope,
        "query_decay": torch.exp(-slope * rng[:, None]),
        "key_decay": torch.exp(-slope * (cfg.block_size - rng[:, None])),
        "diagonal_decay": torch.exp(torch.where(diag >= 0, -diag, float("-inf"))),
    }


def ours_to_hf_disk(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the on-disk per-expert layout that save_pretrained writes (with the lightning buffers)."""
    out: dict[str, torch.Tensor] = {}
    dtype = sd["model.embed_tokens.weight"].dtype
    for li, kind in enumerate(cfg.resolved_layer_types()):
        if kind == LINEAR:
            for k, v in lightning_buffers(cfg, li).items():
                out[f"model.layers.{li}.self_attn.{k}"] = v.to(dtype)
    i = cfg.intermediate_size
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{base}{e}.w1.weight"] = t[e, :i].contiguous()
                out[f"{base}{e}.w3.weight"] = t[e, i:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{base}{e}.w2.weight"] = t[e].contiguous()
        elif name.endswith("mlp.gate.weight"):
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t.contiguous()
        else:
            out[name] = t.contiguous()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
