"""Read and write transformers MiniMax checkpoint directories (safetensors only: no pickles)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model import MiniMaxForCausalLM, ModelConfig
from .convert import CheckpointError, check_checkpoint_layout, ours_to_hf_disk

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


def safetensors_index(path: Path) -> dict[str, str]:
    """tensor name -> file name of a safetensors checkpoint directory (its index json, else every file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        for name in sorted(set(weight_map.values())):
            if not (path / name).is_file():
                raise CheckpointError(f"{index} names shard {name}, which is missing")
        return dict(weight_map)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        hint = (
            " (pytorch_model.bin is not read: unpickling untrusted files is unsafe)"
            if (path / "pytorch_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{path} holds no *.safetensors weights{hint}")
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as fh:
            for k in fh.keys():
                out[k] = name
    return out


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory (whole-checkpoint tools and tests; training reads by slices)."""
    sd: dict[str, torch.Tensor] = {}
    for key, name in safetensors_index(path).items():
        with safe_open(str(path / name), framework="pt") as fh:
            sd[key] = fh.get_tensor(key)
    return sd


class SafetensorsSource:
    """A transformers MiniMax checkpoint directory read by slices (model/init.py's WeightSource): each read
    opens only the tensor slices a box needs, so a rank loads about its own shard plus nothing else.

    Our names are transformers' in-memory names; on disk the experts may be per expert
    (block_sparse_moe.experts.{e}.w1/w3/w2.weight, the released layout) or fused (mlp.experts.gate_up_proj /
    down_proj); the router is block_sparse_moe.gate or mlp.gate. The whole directory's names and shapes are
    checked against the config when the source is opened (from the files' headers, no tensor read)."""

    def __init__(self, path: str | os.PathLike, cfg: ModelConfig):
        self.path, self.cfg = Path(path), cfg
        self.files = safetensors_index(self.path)  # key -> file
        self._handles: dict[str, object] = {}
        self._check()

    def _open(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
        return self._handles[fname]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.files[key]).get_slice(key).get_shape())

    def _slice(self, key: str, index: tuple) -> torch.Tensor:
        return self._open(self.files[key]).get_slice(key)[index]

    def _check(self) -> None:
        shapes = {k: self.shape(k) for k in self.files}
        check_checkpoint_layout(shapes, self.cfg)

    def _per_expert(self, layer: str) -> bool:
        return f"{layer}.block_sparse_moe.experts.0.w1.weight" in self.files

    def read(self, name, shape, offsets, sizes) -> torch.Tensor:
        box = tuple(slice(o, o + n) for o, n in zip(offsets, sizes))
        if name.endswith("mlp.gate.weight"):
            key = name if name in self.files else name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            return self._slice(key, box)
        if name == "lm_head.weight" and name not in self.files and self.cfg.tie_word_embeddings:
            return self._slice("model.embed_tokens.weight", box)
        for suffix in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            if name.endswith(suffix):
                layer = name[: -len(suffix) - 1]
                if not self._per_expert(layer):
                    return self._fused_experts(name, shape, offsets, sizes)
                return self._experts(layer, suffix.endswith("gate_up_proj"), shape, offsets, sizes)
        return self._slice(name, box)

    def _fused_experts(self, name, shape, offsets, sizes) -> torch.Tensor:
        inter = self.cfg.intermediate_size
        if len(shape) == 4:  # the [E, 2, I, H] in-memory view of gate_up [E, 2I, H]: two row ranges
            e0, half0, i0, h0 = offsets
            ne, nh, ni, nH = sizes
            parts = [
                self._slice(
                    name, (slice(e0, e0 + ne), slice(k * inter + i0, k * inter + i0 + ni), slice(h0, h0 + nH))
                )  # fmt: skip
                for k in range(half0, half0 + nh)
            ]
            return torch.stack(parts, dim=1)
        return self._slice(name, tuple(slice(o, o + n) for o, n in zip(offsets, sizes)))

    def _experts(self, layer: str, gate_up: bool, shape, offsets, sizes) -> torch.Tensor:
        """A box of gate_up [E, 2I, H] (or its [E, 2, I, H] view) or down [E, H, I] from per-expert w1/w3/w2,
        copied expert by expert into the box (no second copy of the whole box)."""
        inter = self.cfg.intermediate_size
        base = f"{layer}.block_sparse_moe.experts"
        out = None
        for j, e in enumerate(range(offsets[0], offsets[0] + sizes[0])):
            if not gate_up:
                piece = self._slice(f"{base}.{e}.w2.weight", (slice(offsets[1], offsets[1] + sizes[1]),
                                                                slice(offsets[2], offsets[2] + sizes[2])))  # fmt: skip
            elif len(shape) == 4:
                halves = range(offsets[1], offsets[1] + sizes[1])
                rows, cols = slice(offsets[2], offsets[2] + sizes[2]), slice(offsets[3], offsets[3] + sizes[3])
                piece = torch.stack([self._slice(f"{base}.{e}.{('w1', 'w3')[k]}.weight", (rows, cols))
                                     for k in halves])  # fmt: skip
            else:
                r0, r1 = offsets[1], offsets[1] + sizes[1]
                cols = slice(offsets[2], offsets[2] + sizes[2])
                pieces = []
                if r0 < inter:
                    pieces.append(self._slice(f"{base}.{e}.w1.weight", (slice(r0, min(r1, inter)), cols)))
                if r1 > inter:
                    pieces.append(
                        self._slice(f"{base}.{e}.w3.weight", (slice(max(r0, inter) - inter, r1 - inter), cols))
                    )
                piece = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            if out is None:
                out = torch.empty(tuple(sizes), dtype=piece.dtype)
            out[j] = piece
        return out

    def close(self) -> None:
        """Drop the open files (their mapped pages with them); a later read opens them again."""
        self._handles.clear()


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
            ) -> MiniMaxForCausalLM:  # fmt: skip
    """A transformers MiniMax checkpoint directory -> our model in one process (read by slices, like a layout)."""
    from ..model.init import fill_parameters

    path = Path(path)
    cfg = read_hf_config(path)
    source = SafetensorsSource(path, cfg)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg, seed=None)
    model.to_empty(device=device)
    fill_parameters(model, source)
    return model.to(dtype=dtype)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain (unsharded) tensors, also for models whose parameters are DTensors (FSDP2/TP)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def shard_groups(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into consecutive groups of at most max_bytes (a larger tensor is a group alone)."""
    groups, cur, size = [], [], 0
    for k, n in sizes:
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        groups.append(cur)
    return groups


def shard_file_name(i: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


@contextlib.contextmanager
def hf_output_dir(path: Path, overwrite: bool):
    """A temp dir beside `path` to write an export into, renamed to `path` when the body succeeds, removed
    when it fails: a crash never leaves a half-written export under `path`."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another --out or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf_files(tmp: Path, cfg: ModelConfig, dtype: torch.dtype, tokenizer, weight_map: dict, total: int) -> None:
    """Everything of a transformers directory but the weights: the index (when sharded), config.json,
    generation_config.json and the tokenizer files."""
    if len(set(weight_map.values())) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf_cfg.get(key) is None and getattr(tokenizer, key, None) is not None:
                hf_cfg[key] = getattr(tokenizer, key)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


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
    safetensors + index, tokenizer files (atomically: hf_output_dir). The whole state dict is in memory;
    hf/stream_export.py writes the same files from a checkpoint tensor by tensor."""
    path = Path(path)
    cfg: ModelConfig = model.config
    with hf_output_dir(path, overwrite) as tmp:
        sd = state_dict if state_dict is not None else full_state_dict(model)
        sd = {k: v.to(dtype) if dtype is not None else v for k, v in sd.items()}
        disk = ours_to_hf_disk(sd, cfg)
        groups = shard_groups([(k, v.numel() * v.element_size()) for k, v in disk.items()], max_shard_bytes)
        weight_map, total = {}, 0
        for i, names in enumerate(groups):
            fname = shard_file_name(i, len(groups))
            save_file({k: disk[k] for k in names}, str(tmp / fname), metadata={"format": "pt"})
            for k in names:
                weight_map[k], total = fname, total + disk[k].numel() * disk[k].element_size()
        write_hf_files(tmp, cfg, next(iter(sd.values())).dtype, tokenizer, weight_map, total)
    return path
