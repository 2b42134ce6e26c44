"""HF export/import: transformers loads our exports, round trips are bit-exact, bad checkpoints fail clearly."""

import json

import pytest
import torch
from hf_oracle import random_hf_model, tiny_hf_config
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    MiniMaxForQuestionAnswering,
    MiniMaxForSequenceClassification,
    MiniMaxForTokenClassification,
    MiniMaxModel,
    PreTrainedTokenizerFast,
    pipeline,
)

from minimax_train.hf import CheckpointError, load_hf, save_hf
from minimax_train.hf.io import read_safetensors_dir
from minimax_train.model import MiniMaxForCausalLM, ModelConfig


def tiny_tokenizer():
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for i, w in enumerate("the a cat dog sat ran on mat and is big small red blue".split()):
        vocab[w] = i + 2
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )


def ours_random(**over):
    kw = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        softmax_every=2,
        block_size=4,
        rope_theta=1e4,
        eos_token_id=0,
        bos_token_id=0,
    )
    kw.update(over)
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig(**kw)).eval()


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    ours = ours_random()
    save_hf(ours, tmp_path / "hf", tokenizer=tiny_tokenizer(), max_shard_bytes=60_000)  # force several shards
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files and "generation_config.json" in files
    assert "tokenizer.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf",
        dtype=torch.float32,
        experts_implementation="eager",
        attn_implementation="eager",
        output_loading_info=True,
    )
    hf, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, 99, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "cls", [MiniMaxModel, MiniMaxForSequenceClassification, MiniMaxForTokenClassification, MiniMaxForQuestionAnswering]
)
def test_export_loads_in_sibling_heads(tmp_path, cls):
    ours = ours_random()
    save_hf(ours, tmp_path / "hf")
    model, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True, experts_implementation="eager")
    # heads aside: the causal-LM head is the only tensor a sibling head may leave unused
    assert set(info["unexpected_keys"]) <= {"lm_head.weight"} and not info["mismatched_keys"]
    body = model if cls is MiniMaxModel else model.model
    assert torch.equal(body.layers[1].self_attn.q_proj.weight, ours.model.layers[1].self_attn.q_proj.weight)
    # only the new head (if any) is missing: never a body weight
    assert all(not k.startswith("model.") and "layers" not in k for k in info["missing_keys"]), info["missing_keys"]


def test_pipeline_generates_text(tmp_path):
    ours, tok = ours_random(vocab_size=16), tiny_tokenizer()
    save_hf(ours, tmp_path / "hf", tokenizer=tok)
    gen = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    out = gen("the cat", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = tok("the cat", return_tensors="pt").input_ids
    with torch.no_grad():  # our own greedy decoding, recomputing the whole prefix each step
        for _ in range(5):
            nxt = ours(ids).logits[:, -1].argmax(-1, keepdim=True)
            if nxt.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt], dim=1)
    # the pipeline returns the prompt text followed by the decoded new tokens
    assert ids.shape[1] > 2 and out == "the cat" + tok.decode(ids[0, 2:])


def test_round_trip_hf_ours_hf_is_bit_exact(tmp_path):
    hf = random_hf_model(tiny_hf_config(), seed=2)
    hf.save_pretrained(tmp_path / "src")  # transformers' own on-disk layout (per-expert keys)
    original = read_safetensors_dir(tmp_path / "src")
    ours = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "dst")
    again = read_safetensors_dir(tmp_path / "dst")
    assert sorted(again) == sorted(original)
    for k in original:
        assert again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]), k


def test_import_fused_in_memory_layout(tmp_path):
    hf = random_hf_model(tiny_hf_config(), seed=3)
    (tmp_path / "m").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(hf.config.to_json_string())
    ours = load_hf(tmp_path / "m")
    ids = torch.randint(0, 99, (1, 9))
    with torch.no_grad():
        assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() < 1e-5


def test_import_legacy_config_names(tmp_path):
    hf = random_hf_model(tiny_hf_config(), seed=4)
    hf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    layer_types = cfg.pop("layer_types")
    cfg["attn_type_list"] = [1 if t == "full_attention" else 0 for t in layer_types]
    for new, old in [
        ("full_attn_alpha_factor", "layernorm_full_attention_alpha"),
        ("linear_attn_beta_factor", "layernorm_linear_attention_beta"),
        ("mlp_alpha_factor", "layernorm_mlp_alpha"),
    ]:
        cfg[old] = cfg.pop(new)
    cfg["postnorm"], cfg["shared_intermediate_size"] = True, 0
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(tmp_path / "m")
    assert ours.config.resolved_layer_types() == layer_types
    assert ours.config.full_attn_alpha_factor == hf.config.full_attn_alpha_factor
    ids = torch.randint(0, 99, (1, 9))
    with torch.no_grad():
        assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() < 1e-5


def test_partial_rotary_config_round_trip():
    cfg = ModelConfig(rotary_dim=8, head_dim=16)
    d = cfg.to_hf_dict()
    assert d["rotary_dim"] == 8 and d["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert ModelConfig.from_hf_dict(d).rotary_dim == 8


# ---- bad checkpoints ---------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path):
    save_hf(ours_random(), tmp_path / "hf")
    return tmp_path / "hf"


def _edit_weights(path, fn):
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_tensor_is_named(exported):
    _edit_weights(exported, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_hf(exported)


def test_missing_expert_is_named(exported):
    _edit_weights(exported, lambda sd: sd.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w3\.weight"):
        load_hf(exported)


def test_wrong_shape_is_named(exported):
    def shrink(sd):
        sd["model.norm.weight"] = torch.ones(31)

    _edit_weights(exported, shrink)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(31,\), config expects \(32,\)"):
        load_hf(exported)


def test_unexpected_tensor_is_named(exported):
    _edit_weights(exported, lambda sd: sd.__setitem__("model.layers.0.self_attn.bogus.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.bogus\.weight"):
        load_hf(exported)


def test_unknown_config_key_is_named(exported):
    cfg = json.loads((exported / "config.json").read_text())
    cfg["num_shared_expertz"] = 3
    (exported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown config key 'num_shared_expertz'"):
        load_hf(exported)


def test_not_a_minimax_checkpoint(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a MiniMax checkpoint.*llama"):
        load_hf(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "nope")


def test_pickle_weights_are_refused(tmp_path, exported):
    (exported / "model.safetensors").unlink()
    (exported / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights.*unsafe"):
        load_hf(exported)


def test_export_refuses_to_overwrite(exported):
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(ours_random(), exported)
