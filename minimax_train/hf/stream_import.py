"""A transformers MiniMax directory -> the model and fresh optimiser state of a training checkpoint
(torch.distributed.checkpoint), tensor by tensor.

The checkpoint's structure is planned from a meta-device model and its optimiser: the same state dict
(get_state_dict) that the trainer saves, so the keys, shapes, dtypes and param groups are exactly those of a
one-process save of the loaded model. Every tensor is a meta placeholder until DCP's writer asks for it
(the planner's resolve_data); it is then produced (a weight read from the safetensors files by
SafetensorsSource, per-expert or fused on disk; an Adam moment filled with its initial value), written and
dropped before the next one. DCP's FileSystemWriter keeps every tensor of a file until the file is
complete, so the files here are written by StreamingWriter, one item at a time: the peak memory is about
the largest tensor (one layer's fused experts) plus the file pages it was read from, whatever the size of
the model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ..model import MiniMaxForCausalLM, ModelConfig
from .convert import CheckpointError
from .io import SafetensorsSource


def placeholder_state(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """Give every parameter of `optimizer` (over a meta-device model) the state that get_state_dict gives a
    fresh optimiser (torch's _init_optim_state: one step with zero gradients at lr 0), with its per-element
    tensors as meta placeholders. The state is that of a one-element probe parameter with the group's
    hyperparameters: per-element state starts from a constant (Adam's moments: 0), the rest (Adam's step)
    is copied. Returns, per param group, {state key: the constant} of the per-element entries."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    fills = []
    for group in optimizer.param_groups:
        probe = torch.nn.Parameter(torch.ones(1))
        twin = type(optimizer)([{**{k: v for k, v in group.items() if k != "params"}, "params": [probe]}])
        _init_optim_state(twin)
        state = twin.state[probe]
        fill = {k: v.item() for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == probe.shape}
        for p in group["params"]:
            optimizer.state[p] = {
                k: torch.empty(p.shape, dtype=v.dtype, device="meta") if k in fill else _copy(v)
                for k, v in state.items()
            }
        fills.append(fill)
    return fills


def _copy(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


class ProducingPlanner(DefaultSavePlanner):
    """DCP's default save planner whose items named in `produce` (flattened fqn -> () -> tensor) are made
    when the writer resolves them."""

    def __init__(self, produce: dict[str, Callable[[], torch.Tensor]]):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        make = self.produce.get(write_item.index.fqn)
        return make() if make is not None else super().resolve_data(write_item)


class StreamingWriter(FileSystemWriter):
    """FileSystemWriter (torch.save serialisation, one process) that resolves, writes and drops one item at
    a time, into files of about max_file_bytes (a larger tensor has a file of its own)."""

    def __init__(self, path: str | Path, max_file_bytes: int = 1 << 30):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)
        self.max_file_bytes = max_file_bytes

    def write_data(self, plan, planner):
        import os

        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _item_size, _write_item
        from torch.distributed.checkpoint.planner import WriteItemType

        files, size = [], 0
        for item in plan.items:
            n = _item_size(item) if item.type != WriteItemType.BYTE_IO else 0
            if not files or (files[-1] and size + n > self.max_file_bytes):
                files.append([])
                size = 0
            files[-1].append(item)
            size += n
        results = []
        for i, items in enumerate(files):
            name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes whole storages
                            data = data.clone()
                    results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(results)
        return fut


def _weight(source: SafetensorsSource, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    t = source.read(name, shape, (0,) * len(shape), shape).to(dtype)
    source.close()  # unmap the file pages read for this tensor
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{source.path}: {name} read as {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{source.path}: {name} holds NaN or inf: refusing to import it")
    return t


def import_checkpoint(
    hf_dir: str | Path,
    step_dir: str | Path,
    cfg: ModelConfig,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    *,
    max_file_bytes: int = 1 << 30,
) -> None:
    """Write the {"model", "optim"} DCP data of a checkpoint into `step_dir`: the weights of transformers
    directory `hf_dir` (config `cfg`) in the model's dtype (fp32) and the fresh state of
    make_optimizer(model), as the trainer's CheckpointManager saves them for that model in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..train.checkpoint import quiet_single_process
    from ..train.ckpt_safety import quiet_dcp_errors, wrapped_error

    source = SafetensorsSource(hf_dir, cfg)  # names and shapes checked against cfg, nothing read yet
    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg, seed=None)
    optimizer = make_optimizer(model)
    fills = placeholder_state(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    produce = {f"model.{k}": partial(_weight, source, k, tuple(v.shape), v.dtype) for k, v in model_sd.items()}
    for fill, group in zip(fills, optim_sd["param_groups"]):
        for fqn in group["params"]:
            for k, v in optim_sd["state"][fqn].items():
                if k in fill:
                    produce[f"optim.state.{fqn}.{k}"] = partial(torch.full, tuple(v.shape), fill[k], dtype=v.dtype)
    try:
        with quiet_single_process(), quiet_dcp_errors():
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                storage_writer=StreamingWriter(step_dir, max_file_bytes),
                planner=ProducingPlanner(produce),
                no_dist=True,
            )
    except CheckpointException as e:  # DCP wraps what the writer raised: a refused tensor is the user's error
        refused = wrapped_error(e, CheckpointError)
        if refused is None:
            raise
        raise refused from None
    finally:
        source.close()


__all__ = ["placeholder_state", "ProducingPlanner", "StreamingWriter", "import_checkpoint"]
