"""A training checkpoint (torch.distributed.checkpoint) -> a transformers directory, tensor by tensor.

The names, shapes and dtypes of every output tensor are known from the checkpoint's metadata and the
model config before anything is read, so the shard files (and the index) are planned first, with the
same names, order and splitting as hf/io.py save_hf (fused experts become per-expert w1/w3/w2, the router
moves under block_sparse_moe, the lightning buffers are computed). Each shard file is then written as a
stream: its safetensors header, then each tensor's bytes as soon as it is produced. One checkpoint tensor
is held at a time (loaded alone by dcp.load of a one-entry state dict, which reads only its chunks), so the
peak memory is about the largest tensor of the model (a layer's fused experts) plus one output piece,
whatever the model's size."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..model.config import LINEAR, ModelConfig
from .convert import CheckpointError, expected_shapes, lightning_buffers
from .io import hf_output_dir, shard_file_name, shard_groups, write_hf_files

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_MODEL = "model."  # the DCP key prefix of the model's state dict ({"model": ..., "optim": ...})


@dataclass(frozen=True)
class Piece:
    """One output tensor: `index` of checkpoint tensor `source` (or a computed lightning buffer)."""

    name: str
    shape: tuple[int, ...]
    source: Optional[str] = None  # our state-dict name
    index: tuple = ()
    buffer: Optional[torch.Tensor] = None


def plan_pieces(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[Piece]:
    """The output tensors in save_hf's order (convert.ours_to_hf_disk): lightning buffers, then our state
    dict's tensors in the model's order. `shapes`: our names -> shapes found in the checkpoint."""
    want = expected_shapes(cfg)
    for name, shape in want.items():
        if name not in shapes:
            raise CheckpointError(f"the checkpoint has no tensor {name} (model config: {shape})")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(shapes[name])}, config expects {shape}")
    pieces = []
    for li, kind in enumerate(cfg.resolved_layer_types()):
        if kind == LINEAR:
            for k, v in lightning_buffers(cfg, li).items():
                pieces.append(Piece(f"model.layers.{li}.self_attn.{k}", tuple(v.shape), buffer=v))
    i = cfg.intermediate_size
    for name in _model_order(cfg):
        shape = want[name]
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            for e in range(shape[0]):
                pieces.append(Piece(f"{base}{e}.w1.weight", (i, shape[2]), name, (e, slice(0, i))))
                pieces.append(Piece(f"{base}{e}.w3.weight", (i, shape[2]), name, (e, slice(i, 2 * i))))
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            pieces += [Piece(f"{base}{e}.w2.weight", shape[1:], name, (e,)) for e in range(shape[0])]
        elif name.endswith("mlp.gate.weight"):
            pieces.append(Piece(name.replace(".mlp.gate.", ".block_sparse_moe.gate."), shape, name))
        else:
            pieces.append(Piece(name, shape, name))
    return pieces


def _model_order(cfg: ModelConfig) -> list[str]:
    """Our state dict's names in the model's order (what save_hf iterates), from a meta-device model."""
    from ..model.transformer import MiniMaxForCausalLM

    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg, seed=None)
    names = list(model.state_dict())
    return [n for n in names if not (cfg.tie_word_embeddings and n == "lm_head.weight")]


class CheckpointTensors:
    """Tensors of one DCP checkpoint's model, loaded one at a time (the last one is kept for its pieces)."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        self.meta = FileSystemReader(str(self.path)).read_metadata().state_dict_metadata
        self._name, self._tensor = None, None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            k[len(_MODEL) :]: tuple(v.size) for k, v in self.meta.items() if k.startswith(_MODEL) and hasattr(v, "size")
        }

    def get(self, name: str) -> torch.Tensor:
        if name != self._name:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import FileSystemReader

            from ..train.checkpoint import quiet_single_process

            self._name, self._tensor = None, None  # free the previous tensor before reading the next
            md = self.meta[_MODEL + name]
            sd = {_MODEL + name: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
            with quiet_single_process():
                dcp.load(sd, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
            t = sd[_MODEL + name]
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{self.path}: {name} holds NaN or inf: refusing to export it")
            self._name, self._tensor = name, t
        return self._tensor


def _header(pieces: list[Piece], dtype: torch.dtype) -> bytes:
    entries, offset, size = {"__metadata__": {"format": "pt"}}, 0, torch.finfo(dtype).bits // 8
    for p in pieces:
        n = size
        for d in p.shape:
            n *= d
        entries[p.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _piece_tensor(p: Piece, tensors: CheckpointTensors, dtype: torch.dtype) -> torch.Tensor:
    t = p.buffer if p.buffer is not None else tensors.get(p.source)[p.index]
    return t.to(dtype).contiguous()


def write_safetensors_stream(file: Path, pieces: list[Piece], tensors: CheckpointTensors, dtype: torch.dtype) -> int:
    """One safetensors file of `pieces`, each written as soon as it is made; returns its data bytes."""
    total = 0
    with open(file, "wb") as f:
        f.write(_header(pieces, dtype))
        for p in pieces:
            t = _piece_tensor(p, tensors, dtype)
            if tuple(t.shape) != p.shape:
                raise CheckpointError(f"{p.name}: produced shape {tuple(t.shape)}, planned {p.shape}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            total += t.numel() * t.element_size()
    return total


def export_checkpoint(
    step_dir: str | Path,
    out: str | Path,
    cfg: ModelConfig,
    *,
    dtype: Optional[torch.dtype] = None,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """The transformers directory of checkpoint `step_dir` (whose model config is `cfg`) at `out`, written
    atomically (hf_output_dir), in `dtype` (default: the checkpoint's, fp32 as trained)."""
    out = Path(out)
    with hf_output_dir(out, overwrite) as tmp:
        tensors = CheckpointTensors(Path(step_dir))
        if dtype is None:
            dtype = tensors.meta[_MODEL + "model.embed_tokens.weight"].properties.dtype
        if dtype not in _ST_DTYPES:
            raise ValueError(f"cannot export in {dtype}; choose one of {sorted(map(str, _ST_DTYPES))}")
        pieces = plan_pieces(cfg, tensors.shapes())
        by_name = {p.name: p for p in pieces}
        nbytes = torch.finfo(dtype).bits // 8
        sizes = [(p.name, nbytes * int(torch.Size(p.shape).numel())) for p in pieces]
        groups = shard_groups(sizes, max_shard_bytes)
        weight_map, total = {}, 0
        for i, names in enumerate(groups):
            fname = shard_file_name(i, len(groups))
            total += write_safetensors_stream(tmp / fname, [by_name[n] for n in names], tensors, dtype)
            weight_map.update(dict.fromkeys(names, fname))
        write_hf_files(tmp, cfg, dtype, tokenizer, weight_map, total)
    return out


__all__ = ["Piece", "plan_pieces", "CheckpointTensors", "write_safetensors_stream", "export_checkpoint"]
