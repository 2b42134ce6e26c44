"""Layout planner: which parallel layout trains a model at a given sequence length, batch and GPU count,
how much memory each GPU needs, and how long a step takes.

    from minimax_train.tools.planner import Workload, plan, format_result, load_model_config, gpu_spec
    w = Workload(load_model_config("minimax_text_01"), seq_len=1 << 20, global_batch_tokens=16 << 20,
                 num_gpus=256, gpu=gpu_spec("h100"))
    print(format_result(plan(w)))

Everything here is arithmetic on the model's shapes: nothing is allocated. FLOPs come from
minimax_train.model.flops (count_params, train_flops_per_token), the counter the trainer's MFU uses;
validity comes from minimax_train.parallel.mesh.resolve_layout (the trainer's own check) plus the
zigzag-CP, vocabulary-parallel and batch-split rules.

A layout: tp (tensor parallel, with sequence parallelism when tp > 1), cp (context parallel), dp = world /
(tp * cp), ep / etp (expert parallel / expert tensor parallel; edp = world / (ep * etp) replicates the
experts), the data-parallel engine and its sharding stage (fsdp2 = ZeRO-3 style, or deepspeed ZeRO 1/2/3),
the gradient synchronisation for gradient accumulation (see memory.py), activation checkpointing
(none | selective | full, the trainer's train.activation_checkpointing), and the micro-batch (rows per
forward pass; accumulation = rows per dp rank / micro-batch).

The package's modules: inputs (Workload, Assumptions, Layout), hardware (GPU presets), presets (model
configs), shapes, memory (the memory model), step_time (the time model), search (valid layouts, ranking),
report (printing), cli (tools/plan_layout.py).

All of this is a model: real runs add allocator fragmentation (margin), NCCL and CUDA context memory
(reserve), and kernels that differ from these counts. tools/plot_metrics.py and the trainer's
max_memory_gb metric are how to check a plan against a run; `tools/plan_layout.py --validate-cpu`
compares the estimate with measured peak tensor memory of CPU training steps.
"""

from __future__ import annotations

from minimax_train.tools.planner.cli import main, parse_count
from minimax_train.tools.planner.hardware import GPU_KINDS, GPUSpec, gpu_spec
from minimax_train.tools.planner.inputs import Assumptions, Layout, PlanError, Workload
from minimax_train.tools.planner.memory import GiB, Memory, activation_memory, capacity_bytes, estimate_memory
from minimax_train.tools.planner.presets import conf_model_dir, load_model_config, preset_names
from minimax_train.tools.planner.report import format_header, format_plan, format_result, result_to_dict
from minimax_train.tools.planner.search import (
    AC_MODES,
    ENGINE_STAGES,
    GRAD_SYNCS,
    Constraints,
    Plan,
    PlanResult,
    enumerate_layouts,
    estimate,
    layout_error,
    plan,
)
from minimax_train.tools.planner.shapes import ModelShapes, parameter_split
from minimax_train.tools.planner.step_time import StepTime, estimate_time

__all__ = [
    "GPU_KINDS",
    "GPUSpec",
    "gpu_spec",
    "Workload",
    "Assumptions",
    "Layout",
    "Constraints",
    "Memory",
    "StepTime",
    "Plan",
    "PlanResult",
    "PlanError",
    "load_model_config",
    "preset_names",
    "parameter_split",
    "activation_memory",
    "estimate_memory",
    "estimate_time",
    "estimate",
    "enumerate_layouts",
    "plan",
    "layout_error",
    "format_result",
    "format_plan",
    "result_to_dict",
    "capacity_bytes",
    "conf_model_dir",
    "format_header",
    "ModelShapes",
    "GiB",
    "AC_MODES",
    "ENGINE_STAGES",
    "GRAD_SYNCS",
    "parse_count",
    "main",
]
