"""The config tree: defaults compose and validate; a wrong key, type or value fails up front with a message
naming it; layout errors list the values that would work."""

from __future__ import annotations

import pytest
import torch
from util_train import run_train

from minimax_train.conf_tree import compose_job
from minimax_train.config import ConfigError, JobConfig, TrainConfig, check_batch_layout, to_job_config
from minimax_train.parallel.mesh import ParallelConfig, ParallelConfigError, rank_groups, resolve_layout


def test_default_config_composes_to_the_tiny_cpu_quickstart():
    job = compose_job()
    assert isinstance(job, JobConfig)
    assert job.model.hidden_size == 64 and job.model.vocab_size == 4096
    assert job.data.tokenizer == "embedded" and job.data.sources[0].kind == "embedded"
    t = job.train
    assert (t.seq_len, t.global_batch_size, t.micro_batch_size) == (128, 8, 4) and 100 <= t.steps <= 300
    assert job.logging.wandb.mode == "disabled" and job.parallel.engine == "fsdp2"


@pytest.mark.parametrize(
    "group,option",
    [
        ("model", "minimax_1b"),
        ("model", "minimax_text_01"),
        ("optim", "adamw_wsd"),
        ("train", "gpu"),
        ("logging", "wandb"),
    ],
)
def test_every_preset_composes(group, option):
    job = compose_job(f"{group}={option}")
    assert job is not None


@pytest.mark.parametrize(
    "override,needle",
    [
        ("+train.stepz=5", "train.stepz"),
        ("+model.foo=1", "model.foo"),
        ("+logging.wandb.foo=1", "logging.wandb.foo"),
        ("optim.schedule=foo", "optim.schedule"),
        ("optim.decay_style=exp", "optim.decay_style"),
        ("train.precision=fp8", "train.precision"),
        ("train.activation_checkpointing=some", "train.activation_checkpointing"),
        ("train.global_batch_size=6", "valid micro_batch_size: 1, 2, 3, 6"),
        ("train.steps=0", "train.steps"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("optim.warmup_steps=1000", "optim.warmup_steps"),
        ("logging.wandb.mode=maybe", "logging.wandb.mode"),
        ("model.hidden_act=foo", "model.hidden_act"),
        ("model.num_key_value_heads=3", "model.num_key_value_heads"),
        ("parallel.engine=megatron", "parallel.engine"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("parallel.lasp=ring", "parallel.lasp"),
        ("parallel.grad_sync=always", "parallel.grad_sync"),
        ("logging.profile_start=-1", "logging.profile_start"),
        ("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),
        ("data.valid_fraction=2", "data.valid_fraction"),
        ("data.sources=[{kind:nope}]", "data.sources[0].kind"),
        ("checkpoint.init_from_hf=/no/such/dir", "checkpoint.init_from_hf"),
        ("train.seq_len=100000", "train.seq_len"),
        ("data=jsonl", "data.sources[0].path is required"),
    ],
)
def test_bad_values_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        compose_job(override)
    assert needle in str(e.value)


def test_wrong_type_and_unknown_key_fail_in_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="train.stepz"):
        compose_job("train.stepz=5")
    with pytest.raises(ConfigCompositionException, match="train.steps=abc"):
        compose_job("train.steps=abc")


def test_to_job_config_accepts_plain_dicts():
    job = to_job_config({"train": {"steps": 3}, "optim": {"warmup_steps": 1}})
    assert job.train.steps == 3
    with pytest.raises(ConfigError, match="train.bogus"):
        to_job_config({"train": {"bogus": 1}})


def test_batch_layout_messages():
    t = TrainConfig(global_batch_size=8, micro_batch_size=2)
    assert check_batch_layout(t, 1) == 4 and check_batch_layout(t, 2) == 2 and check_batch_layout(t, 4) == 1
    with pytest.raises(ConfigError, match=r"valid micro_batch_size for dp=8: 1"):
        check_batch_layout(t, 8)
    with pytest.raises(ConfigError, match="multiple of dp=3"):
        check_batch_layout(t, 3)


def test_parallel_layout_errors_list_valid_values():
    from minimax_train.model import ModelConfig

    m = ModelConfig()  # 4 heads, 2 kv heads, 4 experts
    with pytest.raises(ParallelConfigError, match=r"parallel.tp=3 does not divide the world size 8; valid: 1, 2, 4, 8"):
        resolve_layout(ParallelConfig(tp=3), 8)
    with pytest.raises(ParallelConfigError, match=r"parallel.tp=3 does not divide num_attention_heads=4; valid: 1, 2"):
        resolve_layout(ParallelConfig(tp=3), 6, m)
    with pytest.raises(ParallelConfigError, match=r"parallel.cp=3 .*valid: 1, 2, 4"):
        resolve_layout(ParallelConfig(cp=3), 4)
    with pytest.raises(
        ParallelConfigError, match=r"parallel.ep=3 does not divide dp\*cp\*\(tp/etp\)=4.*valid: 1, 2, 4"
    ):
        resolve_layout(ParallelConfig(ep=3), 4)
    with pytest.raises(ParallelConfigError, match=r"parallel.ep=8 does not divide num_local_experts=4; valid: 1, 2, 4"):
        resolve_layout(ParallelConfig(ep=8), 8, m)
    with pytest.raises(ParallelConfigError, match=r"parallel.etp=2 must divide parallel.tp=1"):
        ParallelConfig(etp=2)
    gqa = ModelConfig(num_attention_heads=12, num_key_value_heads=6)
    with pytest.raises(
        ParallelConfigError,
        match=r"parallel.tp=4: num_key_value_heads=6 must divide or be divisible "
        r"by tp; valid: 1, 2",
    ):
        resolve_layout(ParallelConfig(tp=4), 4, gqa)
    with pytest.raises(ParallelConfigError, match=r"parallel.etp=4 does not divide intermediate_size=6; valid: 1, 2"):
        resolve_layout(ParallelConfig(tp=4, etp=4), 4, ModelConfig(intermediate_size=6))
    L = resolve_layout(ParallelConfig(tp=2, cp=2, ep=4, etp=2), 16, m)
    assert (L.dp, L.cp, L.tp, L.edp, L.ep, L.etp) == (4, 2, 2, 2, 4, 2)


def test_rank_groups_layout():
    L = resolve_layout(ParallelConfig(tp=2, cp=2, ep=2, etp=2), 8)
    g = rank_groups(L)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["etp"] == g["tp"]  # expert TP inside attention TP groups
    assert g["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # ep folds over cp first
    assert g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # every rank is in exactly one group of each kind
    for groups in g.values():
        assert sorted(r for grp in groups for r in grp) == list(range(8))


def test_cli_bad_override_fails_before_any_work(tmp_path):
    p = run_train(tmp_path / "r", "train.stepz=5", check=False, timeout=120)
    assert p.returncode != 0 and "train.stepz" in p.stderr
    p = run_train(tmp_path / "r", "optim.schedule=foo", check=False, timeout=120)
    assert p.returncode == 2 and "optim.schedule" in p.stderr and "cosine" in p.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_grad_sync_micro_is_an_fsdp2_setting():
    from minimax_train.parallel.mesh import ParallelConfigError

    with pytest.raises((ConfigError, ParallelConfigError), match="parallel.grad_sync=micro is an fsdp2 setting"):
        compose_job("parallel=deepspeed", "parallel.grad_sync=micro")


@pytest.mark.parametrize("mode,expected", [("step", [False, False, True]), ("micro", [True, True, True])])
def test_grad_sync_mode_decides_when_fsdp_reduces(monkeypatch, mode, expected):
    import minimax_train.train.engine as engine_mod

    calls = []
    monkeypatch.setattr(engine_mod, "set_gradient_sync", lambda model, enabled: calls.append(enabled))
    engine = engine_mod.TorchEngine(torch.nn.Linear(2, 2), None, grad_sync=mode)
    for i in range(3):
        engine.micro_batch(i, last=i == 2)
    assert calls == expected
