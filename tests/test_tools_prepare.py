"""Data preparation: a jsonl / text corpus tokenised in parallel into a Megatron indexed dataset reads back
through the trainer's loader exactly as a direct tokenisation (and as the loader reading the raw corpus);
the Arrow output holds the same tokens; worker count does not change the output; the summary counts
documents, tokens and skipped records; bad input ends with a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from util_train import REPO

from minimax_train.data import DataConfig, SourceConfig, build_loader, load_tokenizer, tokenize_documents
from minimax_train.tools import prepare as PR


def read_prepared(path: str, fmt: str = "megatron") -> list[np.ndarray]:
    """Every document of a prepared corpus as int64 arrays, read independently of the writer."""
    if fmt == "megatron":
        from minimax_train.data.megatron import read_megatron_documents

        return read_megatron_documents(path)
    import datasets

    ds = datasets.load_from_disk(path)
    return [np.asarray(x, dtype=np.int64) for x in ds["input_ids"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A jsonl corpus with varied lengths, unicode, an empty text, a blank line and two malformed records."""
    rng = np.random.default_rng(0)
    words = ["def", "lambda", "λ", "tokens", "x = 1", "print()", "über", "\n", "    return", "# comment", "🙂"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 300)))) for _ in range(60)]
    d = tmp_path_factory.mktemp("corpus")
    path = d / "corpus.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    lines.insert(7, json.dumps({"text": "   "}))  # empty: skipped
    lines.insert(20, "{not json")  # malformed: skipped
    lines.insert(30, json.dumps({"id": 5}))  # no text: malformed
    lines.insert(40, "")  # blank line: not a record
    path.write_text("\n".join(lines) + "\n")
    return path, texts


def _loader_tokens(source: SourceConfig, seq_len: int = 96) -> np.ndarray:
    """All tokens the trainer's loader yields for one pass (valid_fraction 0, no shuffle), concatenated."""
    cfg = DataConfig(sources=[source], tokenizer="embedded", valid_fraction=0.0, shuffle="none")
    tok = load_tokenizer(cfg)
    loader = build_loader(cfg, tok, seq_len=seq_len, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    out = []
    for b in loader:  # the train split repeats: stop once the stream has wrapped into epoch 1
        out.append(b.input_ids.reshape(-1).numpy())
        if loader.state_dict()["sources"][0]["epoch"] > 0:
            return np.concatenate(out)


def test_megatron_round_trip_through_the_trainers_loader(corpus, tmp_path):
    path, texts = corpus
    cfg = PR.PrepareConfig(
        input=str(path), out=str(tmp_path / "mg" / "corpus"), workers=2, batch_docs=7, progress=False
    )
    info = PR.prepare(cfg)
    assert info["documents"] == 60 and info["skipped_empty"] == 1 and info["skipped_malformed"] == 2
    tok = load_tokenizer(DataConfig())
    direct = tokenize_documents(tok, texts, add_eos=True)
    assert info["tokens"] == sum(len(t) for t in direct) and info["max_tokens"] == max(len(t) for t in direct)
    assert sum(h["documents"] for h in info["histogram"]) == 60 and info["dtype"] == "uint16"
    got = read_prepared(info["output"])
    assert len(got) == 60 and all(np.array_equal(a, b) for a, b in zip(got, direct))
    # through the trainer's loader: the megatron source gives the same rows as the direct tokenisation ...
    flat = np.concatenate(direct)
    mg = _loader_tokens(SourceConfig(kind="megatron", path=info["output"]))
    n = len(flat)
    assert np.array_equal(mg[:n], flat)
    # ... and as the loader reading the raw jsonl
    raw = _loader_tokens(SourceConfig(kind="jsonl", path=str(path)))
    assert np.array_equal(raw[:n], mg[:n])
    summary = json.loads(Path(info["summary_file"]).read_text())
    assert summary["documents"] == 60 and summary["tokenizer"] == "embedded"


def test_workers_do_not_change_the_output_and_arrow_holds_the_same_tokens(corpus, tmp_path):
    path, texts = corpus
    one = PR.prepare(PR.PrepareConfig(input=str(path), out=str(tmp_path / "w1"), workers=1, progress=False))
    two = PR.prepare(
        PR.PrepareConfig(input=str(path), out=str(tmp_path / "w2"), workers=2, batch_docs=5, progress=False)
    )
    for ext in (".bin", ".idx"):
        assert Path(one["output"] + ext).read_bytes() == Path(two["output"] + ext).read_bytes()
    arrow = PR.prepare(
        PR.PrepareConfig(
            input=str(path), out=str(tmp_path / "arrow"), format="arrow", workers=2, progress=False, add_eos=False
        )
    )
    direct = tokenize_documents(load_tokenizer(DataConfig(add_eos=False)), texts, add_eos=False)
    got = read_prepared(arrow["output"], "arrow")
    assert len(got) == 60 and all(np.array_equal(a, b) for a, b in zip(got, direct))
    assert (Path(arrow["output"]) / "summary.json").is_file()


def test_text_directory_and_limit(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(5):
        (d / f"doc{i}.txt").write_text(f"file {i}\n" * (i + 1))
    info = PR.prepare(
        PR.PrepareConfig(input=str(d), kind="text", out=str(tmp_path / "t"), limit=3, progress=False, workers=1)
    )
    assert info["documents"] == 3
    text = PR.format_summary(info)
    assert "documents 3" in text and "length histogram" in text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--input", "/no/such.jsonl", "--out", "OUT"], "does not exist"),
        (["--input", "CORPUS", "--out", "OUT", "--tokenizer", "/no/tok"], "unknown tokenizer"),
        (["--input", "CORPUS", "--out", "OUT", "--text-key", "body"], "no documents"),
        (["--input", "CORPUS", "--out", "EXISTING"], "output exists"),
        (["--input", "CORPUS", "--out", "OUT", "--workers", "0"], "must be positive"),
    ],
)
def test_bad_input_is_one_clear_line(corpus, tmp_path, capsys, argv, needle):
    path, _ = corpus
    existing = tmp_path / "existing"
    Path(str(existing) + ".bin").write_bytes(b"x")
    argv = [
        a.replace("CORPUS", str(path)).replace("OUT", str(tmp_path / "out")).replace("EXISTING", str(existing))
        for a in argv
    ]
    assert PR.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("prepare_data: error:") and "Traceback" not in err


def test_cli_progress_bar_and_summary(corpus, tmp_path, capsys):
    path, _ = corpus
    assert PR.main(["--input", str(path), "--out", str(tmp_path / "c"), "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert "documents 60" in cap.out and "length histogram" in cap.out and "tokenising" in cap.err


def test_script_exits_2_on_a_missing_file(tmp_path):
    bad = subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--out",
            str(tmp_path / "d"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr
