"""Small building blocks shared by the model: activations and packed-sequence metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class SequenceCache:
    """Per-sequence values every layer would otherwise rebuild (RoPE tables, the flex block mask, int64
    boundaries for fla). Deliberately not a dict: FSDP2's input casting (torch.distributed.utils.
    _apply_to_tensors) rebuilds every dict and dataclass it meets, which would give each layer a fresh,
    empty cache; an opaque object passes through as itself and stays shared by all layers."""

    def __init__(self):
        self._values: dict = {}

    def __contains__(self, key) -> bool:
        return key in self._values

    def __getitem__(self, key):
        return self._values[key]

    def __setitem__(self, key, value) -> None:
        self._values[key] = value


@dataclass
class PackedSequence:
    """Where documents start and end in the flattened token stream that every layer sees.

    cu_seqlens [N+1] int32 over the local tokens; doc_ids [T] the document of each token; causal_pos [T]
    the index of each token in the (global) packed stream, used for causality; rope_pos [T] the position
    inside its document, used for RoPE. cu_seqlens_host: the same boundaries (int64) on the host when the
    batch brought them there: kernels that size their grids by them then need no device sync."""

    cu_seqlens: torch.Tensor
    doc_ids: torch.Tensor
    causal_pos: torch.Tensor
    rope_pos: torch.Tensor
    cu_seqlens_host: torch.Tensor | None = None
    # init=True: dataclasses.replace (FSDP2 input casting does one per layer) must carry the same cache over
    cache: SequenceCache = field(default_factory=SequenceCache, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.doc_ids.numel()

    def cached(self, key, make):
        """make() once per sequence and key; shared by all layers (and their recomputation)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @property
    def max_doc_len(self) -> int:
        """The longest document (a host int: the flash kernels size their grids by it)."""
        return self.cached("max_doc_len", lambda: int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()))

    @property
    def cu_seqlens_long(self) -> torch.Tensor:
        """cu_seqlens as int64, one tensor per sequence: fla caches its chunk indices by tensor identity."""
        return self.cached("cu_seqlens_long", lambda: self.cu_seqlens.long())

    @classmethod
    def build(cls, batch: int, seqlen: int, device, cu_seqlens=None, position_ids=None) -> PackedSequence:
        n = batch * seqlen
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, n + 1, seqlen, dtype=torch.int32)
        longest = host = None
        if cu_seqlens.device.type == "cpu":  # read on the host before the copy: no device sync later
            host = cu_seqlens.long()
            longest = int((host[1:] - host[:-1]).max())
            first, last = int(host[0]), int(host[-1])
        # non_blocking: a pageable host source is staged at once, without waiting for the stream
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        if longest is None:
            first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != n:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at batch*seq_len={n}, got "
                f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
            )
        causal_pos = torch.arange(n, device=device)
        doc_ids = torch.searchsorted(cu_seqlens[1:].long(), causal_pos, right=True)
        if position_ids is None:
            rope_pos = causal_pos - cu_seqlens.long()[doc_ids]
        else:
            rope_pos = position_ids.reshape(-1).to(device)
        seq = cls(
            cu_seqlens=cu_seqlens, doc_ids=doc_ids, causal_pos=causal_pos, rope_pos=rope_pos, cu_seqlens_host=host
        )
        if longest is not None:
            seq.cache["max_doc_len"] = longest
        return seq
