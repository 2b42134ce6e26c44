"""The baseline implementations of tools/bench_train.py, one process each (`bench_train.py --worker hf|megatron
--spec SPEC.json`): transformers' MiniMaxForCausalLM and megatron-core's GPTModel trained on random tokens,
timed per step, written as a JSON result."""

from __future__ import annotations

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
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            opt_name = "torch AdamW fused"
        except (RuntimeError, TypeError) as e:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
            opt_name = f"torch AdamW foreach (fused unavailable: {one_line(e, 80)})"
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
    import torch.distributed as dist
    import torch.nn.functional as F

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.flops import train_flops_per_token

    cfg = ModelConfig(**spec["cfg"])
    T, dev = spec["seq_len"], torch.device(spec["device"])
    if dev.type == "cuda" and dev.index is None:  # set_device and NCCL device_id need an index
        dev = torch.device("cuda", torch.cuda.current_device())
    gpu = dev.type == "cuda"
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

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if gpu:
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
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

            def step_fn(ids, pos):
                ddp.zero_grad_buffer()
                mopt.zero_grad()
                loss = ddp(ids, pos, None, labels=ids).float().mean()
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
        try:
            opt = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

        def step_fn(ids, pos):
            loss = model(ids, pos, None, labels=ids).float().mean()
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
        ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev, generator=gen)
        return step_fn(ids, pos)

    res = _timed_loop(step, spec["steps"], spec["warmup"], dev, T)
    notes.append("FLOPs counted with every layer softmax (the model megatron trains)")
    res["notes"] = notes
    out = _finish(spec, dev, train_flops_per_token(all_softmax(cfg), T), res)
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    return out


def worker_main(a) -> int:
    spec = json.loads(Path(a.spec).read_text())
    result_path = Path(spec["result"])
    fn = {"hf": worker_hf, "megatron": worker_megatron}[a.worker]
    res, err = guarded(lambda: fn(spec), None, verbose=True)
    if res is None:
        res = {"impl": a.worker, "status": "failed", "reason": err}
        print(f"{a.worker} failed: {err}", flush=True)
    res["impl"] = a.worker
    write_json(str(result_path), res)
    return 0 if res["status"] == "ok" else 1
