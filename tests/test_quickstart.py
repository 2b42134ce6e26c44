"""The quickstart's sample (launch/quickstart.sh, conf/recipe/quickstart.yaml, minimax_train/tools/sample.py):
the recipe composes, the sample statistics tell a loop from code, and a short run of the recipe, exported
and decoded with the quickstart's settings, gives a sample with distinct names and no 4-gram loop."""

from __future__ import annotations

import subprocess
import sys

from util_train import REPO, cli_env, run_train

from minimax_train.conf_tree import compose_job
from minimax_train.tools.sample import DEFAULT_PROMPT, Decoding, generate, main, sample_stats

# plain greedy decoding of the 64-wide tiny model after the earlier quickstart's 1,200 steps
LOOP = "def main(self, *args):\n        return self._w(" + "self._w, " * 16


def test_recipe_composes_to_the_wide_tiny_model():
    job = compose_job("recipe=quickstart")
    assert (job.model.hidden_size, job.model.head_dim * job.model.num_attention_heads) == (128, 128)
    assert job.model.vocab_size == 4096 and job.data.sources[0].kind == "embedded"
    t = job.train
    assert (t.steps, t.seq_len, t.global_batch_size, t.micro_batch_size) == (850, 128, 8, 2)


def test_sample_stats_tell_a_loop_from_code():
    from transformers import AutoTokenizer

    from minimax_train.data.embedded import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    code = (
        "def main(self, name):\n        return self._name\n\n    def __repr__(self, **kwargs):\n"
        "        if isinstance(other, str):\n            raise TypeError('must be a string')\n"
    )
    loop, good = sample_stats(LOOP, tok(LOOP).input_ids), sample_stats(code, tok(code).input_ids)
    assert loop["identifiers"] == 4 and loop["max_4gram"] >= 10
    assert good["identifiers"] == 14 and good["max_4gram"] == 1
    assert sample_stats("x", [1, 2, 3]) == {"identifiers": 1, "max_4gram": 0}


def test_decoding_settings_reach_generate_and_are_printed():
    d = Decoding()
    kw = d.generate_kwargs()
    assert (kw["do_sample"], kw["repetition_penalty"], kw["no_repeat_ngram_size"]) == (False, 1.3, 4)
    assert "top_k" in kw and kw["top_k"] is None  # greedy: the export's generation_config cannot turn sampling on
    s = Decoding(do_sample=True, temperature=0.8, top_k=40, top_p=0.95).describe(seed=7)
    assert s.startswith("sampling, temperature=0.8, top_k=40, top_p=0.95, seed=7, repetition_penalty=1.3")


def test_short_quickstart_run_samples_distinct_code(tmp_path, capsys):
    # 120 of the recipe's 850 steps at its peak lr (constant schedule): ~30 s of training on one CPU thread
    run_train(
        tmp_path,
        "recipe=quickstart",
        "train.steps=120",
        "train.eval_interval=0",
        "optim.schedule=constant",
        "checkpoint.interval=0",
        "logging.interval=50",
        f"checkpoint.dir={tmp_path / 'ck'}",
    )
    exp = subprocess.run(
        [
            sys.executable,
            "-m",
            "minimax_train.export",
            "--checkpoint",
            str(tmp_path / "ck"),
            "--out",
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exp.returncode == 0, exp.stderr[-2000:]
    res = generate(str(tmp_path / "hf"), DEFAULT_PROMPT, Decoding())
    assert res["text"].startswith(DEFAULT_PROMPT) and len(res["new_token_ids"]) >= 40, res
    s = res["stats"]
    assert s["identifiers"] >= 10 and s["max_4gram"] <= 2, (s, res["text"])
    # the command the quickstart runs prints the settings it decoded with next to the same sample
    assert main([str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "decoding: transformers generate, greedy, repetition_penalty=1.3, no_repeat_ngram_size=4" in out
    assert res["text"] in out
