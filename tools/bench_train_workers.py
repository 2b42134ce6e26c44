"""The baseline implementations of tools/bench_train.py, one process each (`bench_train.py --worker
hf|megatron|titan --spec SPEC.json`): transformers' MiniMaxForCausalLM, megatron-core's GPTModel and TorchTitan's
Qwen3 MoE model trained on random tokens, timed per step, written as a JSON result."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from bench_common import cleanup, detect_peak_tflops, device_name, guarded, median, one_line, peak_memory_gb, write_json
from bench_runs import all_softmax

from minimax_train.tools.spawn import free_port


def _timed_loop(step, steps: int, warmup: int, device, seq_len: int) -> dict[str, Any]:
    """Run step() `steps` times; median over the steps after `warmup` (each step synchronised)."""
    import torch

    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss {losses[-1]} at step {i + 1}")
        if i >= warmup:
            times.append(dt)
        print(
            f"step {i + 1}/{steps} loss {losses[-1]:.4f} {dt * 1e3:.1f} ms{' (warm-up)' if i < warmup else ''}",
            flush=True,
        )
    med = median(times)
    return {
        "tokens_per_s": seq_len / med,
        "step_ms": [t * 1e3 for t in times],
        "timed_steps": len(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _finish(spec, device, fpt: float, out: dict[str, Any]) -> dict[str, Any]:
    peak = detect_peak_tflops(device, spec["peak_tflops"])
    tflops = fpt * out["tokens_per_s"] / 1e12
    out.update(
        status="ok",
        tflops_per_gpu=tflops,
        mfu=(tflops / peak) if peak else None,
        peak_tflops=peak,
        peak_mem_gb=peak_memory_gb(device),
        flops_per_token=fpt,
        device=device_name(device),
    )
    return out


def _adamw(params):
    """torch AdamW as every implementation here uses it: (optimizer, its name for the notes)."""
    import torch

    params, kw = list(params), dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "torch AdamW fused"
    except (RuntimeError, TypeError) as e:
        name = f"torch AdamW foreach (fused unavailable: {one_line(e, 80)})"
        return torch.optim.AdamW(params, foreach=True, **kw), name


def _init_one_rank(spec):
    """A world of one process (NCCL on GPU, gloo on CPU), as megatron's and TorchTitan's parallel state need;
    returns the device, with an index on GPU (set_device and NCCL's device_id need one)."""
    import torch
    import torch.distributed as dist

    dev = torch.device(spec["device"])
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dev


def _destroy_group() -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group()
    except Exception:
        pass


def worker_hf(spec) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.flops import train_flops_per_token

    cfg = ModelConfig(**spec["cfg"])
    T, dev = spec["seq_len"], torch.device(spec["device"])
    gpu = dev.type == "cuda"
    notes = [f"transformers {transformers.__version__}"]
    torch.manual_seed(spec["seed"])
    d = cfg.to_hf_dict()
    d["output_router_logits"] = True  # train with the router aux loss, as ours and megatron do
    d["use_cache"] = False
    kw = {"attn_implementation": "sdpa"}
    experts = spec.get("hf_experts")
    if experts:
        kw["experts_implementation"] = experts

    def build(kw):
        hf_cfg = MiniMaxConfig(**d, **kw)
        with torch.device(dev):
            model = MiniMaxForCausalLM(hf_cfg)
        model.float().train()
        return model

    def run(kw):
        model = build(kw)
        impl_attn = getattr(model.config, "_attn_implementation", "?")
        impl_exp = getattr(model.config, "_experts_implementation", None)
        opt, opt_name = _adamw(model.parameters())
        gen = torch.Generator(device=dev).manual_seed(spec["seed"])

        def step(i):
            ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev, generator=gen)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=gpu):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        res = _timed_loop(step, spec["steps"], spec["warmup"], dev, T)
        res["notes"] = [
            f"attn_implementation={impl_attn}",
            f"experts_implementation={impl_exp}",
            f"fp32 params{' + bf16 autocast' if gpu else ''}",
            opt_name,
            "random tokens, one document per row",
        ]
        return res

    try:
        res = run(kw)
    except Exception as e:  # noqa: BLE001
        err = one_line(e)
        if "experts_implementation" in kw or err.startswith("OOM"):
            raise
        del e
        cleanup(dev)
        # transformers' default experts path (grouped_mm) failed: what a user then does is pick eager
        notes.append(f"default experts implementation failed ({err}); retried with experts_implementation=eager")
        kw["experts_implementation"] = "eager"
        if gpu:
            torch.cuda.reset_peak_memory_stats(dev)
        res = run(kw)
    notes += res.pop("notes")
    res["notes"] = notes
    return _finish(spec, dev, train_flops_per_token(cfg, T), res)


def _megatron_cpu_shims():
    """CPU smoke only: megatron-core's RoPE and MoE code call torch.cuda.current_device() unconditionally."""
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")


def _megatron_shims() -> list[str]:
    """megatron-core 0.16.x without Transformer Engine references an undefined te_general_gemm in the router."""
    notes = []
    try:
        import megatron.core.transformer.moe.moe_utils as mu

        if not hasattr(mu, "te_general_gemm"):
            mu.te_general_gemm = None
            notes.append("shim: moe_utils.te_general_gemm = None (megatron-core 0.16 bug without TE)")
    except Exception:
        pass
    return notes


def _sdpa_core_attention():
    """megatron's DotProductAttention with the score/softmax/context computed by torch SDPA (flash on GPU).

    Same inputs and output layout: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]; causal."""
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPADotProductAttention(DotProductAttention):
        def forward(
            self,
            query,
            key,
            value,
            attention_mask=None,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
            **kwargs,
        ):
            assert packed_seq_params is None and attention_bias is None
            sq, b, nq, hn = query.shape
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            if k.shape[1] != nq:
                try:
                    o = F.scaled_dot_product_attention(
                        q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True
                    )
                except (RuntimeError, TypeError):
                    rep = nq // k.shape[1]
                    o = F.scaled_dot_product_attention(
                        q,
                        k.repeat_interleave(rep, 1),
                        v.repeat_interleave(rep, 1),
                        is_causal=True,
                        scale=self.softmax_scale,
                    )
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            return o.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)

    return SDPADotProductAttention


def worker_megatron(spec) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    import torch
    import torch.nn.functional as F

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.flops import train_flops_per_token

    cfg = ModelConfig(**spec["cfg"])
    T, gpu = spec["seq_len"], spec["device"] == "cuda"
    notes = []
    if not gpu:
        _megatron_cpu_shims()
        notes.append("CPU smoke: torch.cuda.current_device mapped to cpu (megatron hard-codes CUDA in RoPE)")
    import megatron.core
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    notes.insert(0, f"megatron-core {getattr(megatron.core, '__version__', '?')}")
    notes += _megatron_shims()

    dev = _init_one_rank(spec)
    parallel_state.initialize_model_parallel()
    torch.manual_seed(spec["seed"])
    if gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(spec["seed"])

    try:
        import grouped_gemm  # noqa: F401  (nv-grouped-gemm: megatron's GroupedMLP without TE)

        grouped = True
    except ImportError:
        grouped = False
    dtype = torch.bfloat16 if gpu else torch.float32
    tc = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        moe_ffn_hidden_size=cfg.intermediate_size,
        num_moe_experts=cfg.num_local_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_aux_loss_coeff=cfg.router_aux_loss_coef,
        moe_router_load_balancing_type="aux_loss",
        moe_grouped_gemm=grouped,
        moe_token_dispatcher_type="alltoall" if gpu else "allgather",
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=gpu,
        params_dtype=dtype,
        use_cpu_initialization=not gpu,
        init_method_std=cfg.initializer_range,
    )
    config = TransformerConfig(**tc)
    spec_layer = get_gpt_layer_local_spec(
        num_experts=cfg.num_local_experts, moe_grouped_gemm=grouped, normalization="RMSNorm"
    )
    if spec["megatron_attn"] == "sdpa":
        spec_layer.submodules.self_attention.submodules.core_attention = _sdpa_core_attention()
        notes.append("core attention: torch SDPA causal (flash) in place of TE's fused attention (no TE)")
    else:
        notes.append("core attention: megatron's unfused DotProductAttention")

    def build_model():
        m = GPTModel(
            config=config,
            transformer_layer_spec=spec_layer,
            vocab_size=cfg.vocab_size,
            max_sequence_length=T,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=cfg.effective_rotary_dim / cfg.head_dim,
            rotary_base=int(cfg.rope_theta),
        )
        return m.cuda(dev) if gpu else m

    model = build_model()
    experts_cls = type(model.decoder.layers[0].mlp.experts).__name__
    notes.append(
        f"experts: {experts_cls} ({'nv-grouped-gemm' if grouped else 'no grouped_gemm package'}), "
        f"dispatcher {tc['moe_token_dispatcher_type']}, RMSNorm pre-norm, SwiGLU, no bias, RoPE, "
        f"{'bf16 params' if gpu else 'fp32'}"
    )

    step_fn, opt_note = None, None
    if spec["megatron_optimizer"] in ("auto", "megatron") and gpu:

        def build_megatron():
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            ddp = DistributedDataParallel(
                config=config,
                module=model,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
                ),
            )
            ocfg = OptimizerConfig(
                optimizer="adam",
                lr=1e-4,
                weight_decay=0.1,
                adam_beta1=0.9,
                adam_beta2=0.95,
                bf16=True,
                use_distributed_optimizer=False,
                clip_grad=1.0,
            )
            opt = get_megatron_optimizer(ocfg, [ddp])
            return ddp, opt

        built, err = guarded(build_megatron, dev)
        if built is None:  # DDP may have hooked the parameters: start again from a fresh model
            model = None
            cleanup(dev)
            model = build_model()
        if built is not None:
            ddp, mopt = built

            def step_fn(ids, pos, labels):
                ddp.zero_grad_buffer()
                mopt.zero_grad()
                loss = ddp(ids, pos, None, labels=labels).float().mean()
                loss.backward()
                ddp.finish_grad_sync()
                mopt.step()
                return loss.detach()

            opt_note = (
                "optimizer: megatron DDP (fp32 grad buffer) + get_megatron_optimizer "
                f"({type(mopt).__name__}: bf16 params, fp32 main params, torch Adam without apex/TE)"
            )
        elif spec["megatron_optimizer"] == "megatron":
            raise RuntimeError(f"megatron optimizer: {err}")
        else:
            notes.append(f"megatron optimizer unavailable ({err}); torch AdamW instead")
    if step_fn is None:
        params = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().float().clone().requires_grad_() for p in params] if gpu else params
        opt, _ = _adamw(master)

        def step_fn(ids, pos, labels):
            loss = model(ids, pos, None, labels=labels).float().mean()
            loss.backward()
            if gpu:
                for p, m in zip(params, master):
                    m.grad = p.grad.float() if p.grad is not None else None
                    p.grad = None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gpu:
                torch._foreach_copy_(params, [m.detach() for m in master])
            return loss.detach()

        opt_note = (
            "optimizer: torch AdamW over fp32 master copies of the bf16 params (megatron's optimizer not used)"
            if gpu
            else "optimizer: torch AdamW (fp32; megatron's optimizer needs CUDA)"
        )
    notes.append(opt_note)

    gen = torch.Generator(device=dev).manual_seed(spec["seed"])
    pos = torch.arange(T, device=dev)[None]

    def step(i):
        # GPTModel takes labels already shifted: position t learns token t + 1
        ids = torch.randint(0, cfg.vocab_size, (1, T + 1), device=dev, generator=gen)
        return step_fn(ids[:, :-1], pos, ids[:, 1:])

    res = _timed_loop(step, spec["steps"], spec["warmup"], dev, T)
    notes.append("FLOPs counted with every layer softmax (the model megatron trains)")
    res["notes"] = notes
    out = _finish(spec, dev, train_flops_per_token(all_softmax(cfg), T), res)
    _destroy_group()
    return out


def _titan_shims(gpu: bool) -> list[str]:
    """What torchtitan 0.3.0 needs on a torch older than 2.13 (whose API it calls) or on CPU: two names torch 2.11/2.12 lack
    (each the behaviour the older torch has anyway), its device type on CPU. Returns the notes saying what was done."""
    import inspect
    import sys
    import types

    import torch
    import torch.distributed.fsdp as fsdp

    notes = []
    if not hasattr(fsdp, "DataParallelMeshDims"):  # torch < 2.12; built by torchtitan only for meshes of several ranks

        @dataclasses.dataclass
        class DataParallelMeshDims:
            shard: Any = None
            replicate: Any = None

        fsdp.DataParallelMeshDims = DataParallelMeshDims
        notes.append(f"shim: torch {torch.__version__} has no fsdp.DataParallelMeshDims (imported by torchtitan)")
    if not gpu:
        import torchtitan.tools.utils as tu

        # torchtitan reads its device type at import and takes "cuda" when no accelerator is visible
        tu.device_type, tu.device_module = "cpu", torch.cpu
        try:
            import triton  # noqa: F401
        except ImportError:  # the CPU torch has no triton: its expert-parallel kernels are imported, never run at EP=1
            stub = types.ModuleType("torchtitan.distributed.minimal_async_ep.kernels")
            stub.__getattr__ = lambda name: None
            sys.modules[stub.__name__] = stub
        notes.append("CPU smoke: torchtitan's device type set to cpu, its EP Triton kernels stubbed (no triton)")
    import torchtitan.models.common.decoder as decoder
    from torch.nn.attention.flex_attention import create_block_mask

    if "separate_full_blocks" not in inspect.signature(create_block_mask).parameters:  # torch < 2.13
        make = decoder.create_attention_mask

        def create_attention_mask(*args, separate_full_blocks=True, **kwargs):
            # older torch always separates the full blocks: what torchtitan asks for outside batch-invariant mode
            assert separate_full_blocks
            return make(*args, **kwargs)

        decoder.create_attention_mask = create_attention_mask
        notes.append(f"shim: torch {torch.__version__}'s create_block_mask takes no separate_full_blocks (always on)")
    return notes


def _titan_model_config(cfg, seq_len: int, attn: str):
    """TorchTitan's Qwen3 MoE config at cfg's widths, every layer softmax attention, as megatron's GPTModel is."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.qwen3 import (
        _EMBEDDING_INIT,
        _EMBEDDING_SKIP_INIT,
        _LINEAR_INIT,
        Qwen3Model,
        _build_qwen3_moe_layers,
        _qwen3_norm,
    )

    h, v = cfg.hidden_size, cfg.vocab_size
    layers = _build_qwen3_moe_layers(
        n_layers=cfg.num_hidden_layers,
        dim=h,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        moe_hidden_dim=cfg.intermediate_size,
        num_experts=cfg.num_local_experts,
        top_k=cfg.num_experts_per_tok,
        # its language-model configs refuse sdpa (they want masks from positions): swapped in below
        attn_backend="flex" if attn == "sdpa" else attn,
        moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=cfg.head_dim, max_seq_len=seq_len, theta=float(cfg.rope_theta)),
    )
    norm = _qwen3_norm(h)
    norm.eps = cfg.rms_norm_eps
    for layer in layers:
        layer.attention.qk_norm = None  # Qwen3's QK norm: MiniMax (and megatron's peer) has none
        layer.attention_norm.eps = layer.ffn_norm.eps = cfg.rms_norm_eps
        if attn == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    tied = cfg.tie_word_embeddings
    return Qwen3Model.Config(
        vocab_size=v,
        dim=h,
        norm=norm,
        enable_weight_tying=tied,
        # as its own configs: a tied embedding takes the lm_head's init
        tok_embeddings=Embedding.Config(
            num_embeddings=v, embedding_dim=h, param_init=_EMBEDDING_SKIP_INIT if tied else _EMBEDDING_INIT
        ),
        lm_head=Linear.Config(in_features=h, out_features=v, param_init=_LINEAR_INIT),
        layers=layers,
    )


def _titan_unexpressed(cfg) -> list[str]:
    """The ModelConfig fields TorchTitan's Qwen3 MoE cannot express, as they stand in cfg."""
    out = ["pre-norm blocks without MiniMax's residual alpha/beta factors (as megatron's peer)"]
    if cfg.effective_rotary_dim != cfg.head_dim:
        out.append(f"rotary_dim={cfg.rotary_dim}: CosSinRoPE rotates all {cfg.head_dim} dims (no FLOPs counted)")
    if cfg.router_aux_loss_coef:
        out.append(
            f"router_aux_loss_coef={cfg.router_aux_loss_coef}: no aux loss; its aux-loss-free expert bias instead"
        )
    if cfg.moe_routing != "dropless" or cfg.router_jitter_noise:
        out.append(f"moe_routing={cfg.moe_routing}, jitter {cfg.router_jitter_noise}: dropless, no jitter")
    if cfg.hidden_act != "silu":
        out.append(f"hidden_act={cfg.hidden_act}: SwiGLU (silu) experts")
    if cfg.init != "normal" or cfg.initializer_range != 0.02:
        out.append(f"init={cfg.init} std {cfg.initializer_range}: Qwen3's normal(0.02) init")
    return out


def worker_titan(spec) -> dict[str, Any]:
    import tempfile

    import torch

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.flops import count_params, train_flops_per_token

    cfg = ModelConfig(**spec["cfg"])
    T, gpu = spec["seq_len"], spec["device"] == "cuda"
    attn = spec.get("titan_attn") or "auto"
    if attn == "auto":
        attn = "flex" if gpu else "sdpa"  # flex_attention has no backward on CPU
    try:
        notes = _titan_shims(gpu)
        import torchtitan
        from torchtitan.components.loss import cross_entropy_loss
        from torchtitan.components.optimizer import register_moe_load_balancing_hook
        from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed.utils import clip_grad_norm_, get_spmd_context
        from torchtitan.models.qwen3 import parallelize_qwen3
    except ImportError as e:
        msg = f"torchtitan not importable ({one_line(e, 100)}): its install line is in bench_train.py --help"
        raise ImportError(msg) from None

    notes.insert(0, f"torchtitan {torchtitan.__version__}, Qwen3 MoE model, attention backend {attn}")
    dev = _init_one_rank(spec)
    pdims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    pdims.build_mesh()
    with torch.device("meta"):
        model = _titan_model_config(cfg, T, attn).build()
    # its trainer's one-GPU path: FSDP2 over a mesh of one rank, whose MixedPrecisionPolicy casts the fp32
    # parameters to bf16 for compute (fp32 on CPU, as the other CPU smokes); no AC, no compile (eager peers)
    model = parallelize_qwen3(
        model,
        parallel_dims=pdims,
        training=TrainingConfig(mixed_precision_param="bfloat16" if gpu else "float32"),
        parallelism=ParallelismConfig(),
        compile_config=CompileConfig(enable=False),
        ac_config=None,
        dump_folder=tempfile.mkdtemp(prefix="titan_"),
    )
    model.to_empty(device=dev)
    torch.manual_seed(spec["seed"])
    with torch.no_grad():
        model.init_weights()
    model.train()
    params = list(model.parameters())
    n_params, n_expected = sum(p.numel() for p in params), count_params(all_softmax(cfg)).total
    opt, opt_name = _adamw(params)
    register_moe_load_balancing_hook(opt, [model], pdims)
    moe = model.layers["0"].moe
    notes += [
        f"{n_params:,} params ({'=' if n_params == n_expected else '!='} {n_expected:,} of the all-softmax ModelConfig)",
        f"experts: {type(moe.routed_experts.inner_experts).__name__} (torch._grouped_mm in bf16), "
        f"{type(moe.routed_experts.token_dispatcher).__name__} at EP=1, softmax top-{cfg.num_experts_per_tok} "
        f"router renormalised, aux-loss-free load balancing (expert bias, coeff {moe.load_balance_coeff}, "
        "optimizer pre-hook)",
        f"FSDP2 on one rank, MixedPrecisionPolicy param {'bf16' if gpu else 'fp32'} / reduce fp32, fp32 params",
        f"{opt_name}; TorchTitan's clip_grad_norm_ 1.0; its cross_entropy_loss over the shifted labels",
        "not expressed: " + "; ".join(_titan_unexpressed(cfg)),
    ]

    gen = torch.Generator(device=dev).manual_seed(spec["seed"])
    pos = torch.arange(T, device=dev)[None]
    train_ctx = get_spmd_context(parallel_dims=pdims)

    def step(i):
        ids = torch.randint(0, cfg.vocab_size, (1, T + 1), device=dev, generator=gen)
        inputs, labels = ids[:, :-1], ids[:, 1:]  # TorchTitan's dataloaders: labels are the inputs shifted by one
        with train_ctx():
            # one document per row (positions 0..T-1); as its trainer, masks for the masked backends only
            masks = None if attn == "sdpa" else model.get_attention_masks(positions=pos)
            loss = cross_entropy_loss(model(inputs, pos, masks), labels) / labels.numel()
            loss.backward()
        clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    res = _timed_loop(step, spec["steps"], spec["warmup"], dev, T)
    notes.append("FLOPs counted with every layer softmax (the model TorchTitan trains)")
    res.update(notes=notes, params=n_params, params_expected=n_expected, attn_backend=attn)
    out = _finish(spec, dev, train_flops_per_token(all_softmax(cfg), T), res)
    _destroy_group()
    return out


def worker_main(a) -> int:
    spec = json.loads(Path(a.spec).read_text())
    result_path = Path(spec["result"])
    fn = {"hf": worker_hf, "megatron": worker_megatron, "titan": worker_titan}[a.worker]
    res, err = guarded(lambda: fn(spec), None, verbose=True)
    if res is None:
        res = {"impl": a.worker, "status": "failed", "reason": err}
        print(f"{a.worker} failed: {err}", flush=True)
    res["impl"] = a.worker
    write_json(str(result_path), res)
    return 0 if res["status"] == "ok" else 1
