"""Data sources and errors: jsonl/parquet/text/hf/megatron readers, malformed and empty data,
missing paths, tokenizers, and the embedded corpus + tokenizer."""

import gzip
import json
import os
import re
import threading

import numpy as np
import pytest
import torch
from util_data import make_docs, write_jsonl

from minimax_train.data import (
    EMBEDDED_VOCAB_SIZE,
    DataConfig,
    DataError,
    SourceConfig,
    build_loader,
    embedded,
    load_tokenizer,
    tokenize_documents,
)

pytestmark = pytest.mark.usefixtures("data_cache_env")


def stream_tokens(cfg, tok, n_rows, seq_len=64, seed=0, split="train"):
    loader = build_loader(cfg, tok, seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_size=1, seed=seed, split=split)
    return torch.cat([next(loader).input_ids.flatten() for _ in range(n_rows)]).numpy()


def direct_stream(tok, docs):
    return np.concatenate(tokenize_documents(tok, docs, add_eos=True))


def one_source(kind, path, **kw):
    src = {k: kw.pop(k) for k in list(kw) if k in ("text_key", "sample_by", "streaming", "split", "name")}
    kw.setdefault("valid_fraction", 0.0)
    kw.setdefault("shuffle", "none")
    return DataConfig(sources=[SourceConfig(kind=kind, path=str(path), **src)], **kw)


# ---- local files -----------------------------------------------------------------------------------
def test_jsonl_dir_glob_gzip_and_text_key(tmp_path, tok):
    docs_a, docs_b = make_docs(5, prefix="a"), make_docs(4, prefix="b", seed=1)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "sub" / "1.jsonl", docs_a, key="body")
    with gzip.open(d / "2.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(docs_b))
    (d / "notes.md").write_text("ignored")
    expect = direct_stream(tok, docs_b + docs_a)  # sorted paths: 2.jsonl.gz before sub/1.jsonl
    n = len(expect) // 64
    assert np.array_equal(stream_tokens(one_source("jsonl", d, text_key="body"), tok, n), expect[: n * 64])
    assert np.array_equal(
        stream_tokens(one_source("jsonl", f"{d}/**/*.jsonl*", text_key="body"), tok, n), expect[: n * 64]
    )


def test_malformed_jsonl_lines_are_counted_then_fatal(tmp_path, tok):
    good = make_docs(6)
    lines = [
        json.dumps({"text": good[0]}),
        "{not json",
        json.dumps([1, 2]),
        "",
        json.dumps({"text": good[1]}),
        json.dumps({"other": "x"}),
        json.dumps({"text": 5}),
        "   ",
        json.dumps({"text": good[2]}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = one_source("jsonl", path, max_bad_lines=4)
    loader = build_loader(cfg, tok, seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    assert loader.stats["sources"][0]["bad_records"] == 4 and loader.stats["sources"][0]["documents"] == 3
    expect = direct_stream(tok, good[:3])
    got = torch.cat([next(loader).input_ids.flatten() for _ in range(len(expect) // 16)]).numpy()
    assert np.array_equal(got, expect[: len(got)])
    with pytest.raises(DataError, match=r"4 malformed lines.*max_bad_lines=3.*bad\.jsonl:2: invalid JSON"):
        build_loader(
            one_source("jsonl", path, max_bad_lines=3),
            tok,
            seq_len=16,
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )


def test_parquet_reader_with_null_records(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(8)
    texts = docs[:3] + [None] + docs[3:]
    pq.write_table(pa.table({"content": texts, "n": list(range(9))}), tmp_path / "x.parquet")
    cfg = one_source("parquet", tmp_path / "x.parquet", text_key="content", cache_dir=str(tmp_path / "hf"))
    expect = np.concatenate([direct_stream(tok, docs)] * 2)  # two epochs, the second from the token cache
    n = len(expect) // 64
    assert np.array_equal(stream_tokens(cfg, tok, n), expect[: n * 64])
    with pytest.raises(DataError, match=r"null 'content'.*max_bad_lines=0"):
        build_loader(
            one_source(
                "parquet", tmp_path / "x.parquet", text_key="content", max_bad_lines=0, cache_dir=str(tmp_path / "hf")
            ),
            tok,
            seq_len=8,
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )
    with pytest.raises(DataError, match=r"no column 'text'.*content"):
        build_loader(
            one_source("parquet", tmp_path / "x.parquet", cache_dir=str(tmp_path / "hf")),
            tok,
            seq_len=8,
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )


def test_text_files_by_document_and_line(tmp_path, tok):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("first line\nsecond line\n\nthird\n")
    (d / "b.txt").write_text("other file\n")
    by_doc = stream_tokens(one_source("text", d, cache_dir=str(tmp_path / "hf")), tok, 1, seq_len=8)
    expect = direct_stream(tok, ["first line\nsecond line\n\nthird\n", "other file\n"])
    assert np.array_equal(by_doc, expect[:8])
    lines = ["first line\n", "second line\n", "third\n", "other file\n"]  # the blank line is skipped
    expect = direct_stream(tok, lines)
    got = stream_tokens(one_source("text", d, sample_by="line", cache_dir=str(tmp_path / "hf")), tok, 2, seq_len=8)
    assert np.array_equal(got, np.concatenate([expect, expect])[:16])


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_local_dataset_dir(tmp_path, tok, streaming):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(20)
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "ds" / "train.parquet")

    def cfg(shuffle):
        return DataConfig(
            sources=[SourceConfig(kind="hf", path=str(tmp_path / "ds"), streaming=streaming)],
            valid_fraction=0.0,
            cache_dir=str(tmp_path / "hf"),
            shuffle_buffer=8,
            shuffle=shuffle,
        )

    kw = dict(seq_len=32, micro_batch_size=2, dp_rank=0, dp_size=1, seed=4)
    epoch = direct_stream(tok, docs)
    n = len(epoch) // 64 + 4  # crosses into the second epoch
    for shuffle in ("documents", "samples"):
        full = build_loader(cfg(shuffle), tok, **kw)
        ref = [next(full) for _ in range(n)]
        part = build_loader(cfg(shuffle), tok, **kw)
        for _ in range(n - 7):
            next(part)
        resumed = build_loader(cfg(shuffle), tok, **kw)
        resumed.load_state_dict(part.state_dict())
        assert all(torch.equal(next(resumed).input_ids, b.input_ids) for b in ref[n - 7 :])
        if shuffle == "documents":
            toks = torch.cat([b.input_ids.flatten() for b in ref]).numpy()
            assert sorted(toks[: len(epoch)].tolist()) == sorted(epoch.tolist())  # one shuffled epoch
            assert not np.array_equal(toks[: len(epoch)], epoch)
            packed = [r for b in ref for r in b.input_ids]
        else:  # the rows starting in epoch 0, shuffled (the buffer holds the whole epoch here)
            rows = [r for b in ref for r in b.input_ids]
            w = -(-len(epoch) // 32)
            key = [r.numpy().tobytes() for r in packed[:w]]
            assert sorted(r.numpy().tobytes() for r in rows[:w]) == sorted(key)
            assert [r.numpy().tobytes() for r in rows[:w]] != key


def test_hf_missing_local_path(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nowhere/at/all"):
        build_loader(
            DataConfig(sources=[SourceConfig(kind="hf", path=str(tmp_path / "nowhere/at/all"))]),
            tok,
            seq_len=8,
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )


# ---- Megatron indexed -------------------------------------------------------------------------------
def test_megatron_roundtrip_equals_direct_tokenisation(tmp_path, tok):
    from minimax_train.data.megatron import merge_megatron_datasets, read_megatron_documents, write_megatron_dataset

    docs = make_docs(30)
    jsonl = write_jsonl(tmp_path / "docs.jsonl", docs)
    toks = tokenize_documents(tok, docs, add_eos=True)
    prefix = write_megatron_dataset(tmp_path / "mg" / "corpus", toks[:20])
    write_megatron_dataset(tmp_path / "mg" / "rest", toks[20:], dtype=np.uint16)
    merged = merge_megatron_datasets(tmp_path / "mg" / "all", [prefix, str(tmp_path / "mg" / "rest.bin")])
    back = read_megatron_documents(merged)
    assert len(back) == 30 and all(np.array_equal(a, b) for a, b in zip(back, toks))
    # Through the loader (shuffled, several epochs): identical rows to tokenising the jsonl directly.
    a = DataConfig(sources=[SourceConfig(kind="megatron", path=merged + ".idx")], valid_fraction=0.0)
    b = DataConfig(sources=[SourceConfig(kind="jsonl", path=jsonl)], valid_fraction=0.0)
    n = 2 * sum(map(len, toks)) // 64 + 3
    assert np.array_equal(stream_tokens(a, tok, n, seed=9), stream_tokens(b, tok, n, seed=9))
    # A Megatron document of several sequences (preprocess_data --split-sentences) reads as one.
    from minimax_train.data.megatron import _indexed_dataset_module

    idx = _indexed_dataset_module()
    builder = idx.IndexedDatasetBuilder(str(tmp_path / "mg" / "sent.bin"), dtype=np.int32)
    builder.add_document(np.array([5, 6, 7, 8, 9]), [2, 3])
    builder.add_document(np.array([1, 2]), [2])
    builder.finalize(str(tmp_path / "mg" / "sent.idx"))
    assert [d.tolist() for d in read_megatron_documents(str(tmp_path / "mg" / "sent"))] == [[5, 6, 7, 8, 9], [1, 2]]
    with pytest.raises(DataError, match="uint16"):
        write_megatron_dataset(tmp_path / "mg" / "big", [[70000]], dtype=np.uint16)
    with pytest.raises(FileNotFoundError, match=r"missing.*nope\.bin"):
        build_loader(
            DataConfig(sources=[SourceConfig(kind="megatron", path=str(tmp_path / "nope"))]),
            tok,
            seq_len=8,
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            seed=0,
        )


# ---- errors -----------------------------------------------------------------------------------------
def _build(cfg, tok):
    return build_loader(cfg, tok, seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_empty_datasets_are_clear_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        _build(one_source("jsonl", tmp_path / "empty.jsonl"), tok)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"holds no files ending in \.jsonl.*empty dataset"):
        _build(one_source("jsonl", tmp_path / "d"), tok)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "   ", "\n"])
    loader = _build(one_source("jsonl", blank), tok)
    with pytest.raises(DataError, match="no documents for the train split"):
        next(loader)


def test_missing_paths_name_the_path(tmp_path, tok):
    for kind in ("jsonl", "parquet", "text"):
        with pytest.raises(FileNotFoundError, match=r"data\.sources\[0\].*does-not-exist"):
            _build(one_source(kind, tmp_path / "does-not-exist.x"), tok)
    with pytest.raises(FileNotFoundError, match=r"no files match.*\*\.jsonl"):
        _build(one_source("jsonl", tmp_path / "*.jsonl"), tok)


def test_config_validation_names_the_key(tok):
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.kind='csv' is not one of"):
        _build(DataConfig(sources=[SourceConfig(kind="csv", path="x")]), tok)
    with pytest.raises(DataError, match=r"data\.sources\[1\]\.weight"):
        _build(DataConfig(sources=[SourceConfig(), SourceConfig(weight=0.0)]), tok)
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.path is required"):
        _build(DataConfig(sources=[SourceConfig(kind="jsonl")]), tok)
    with pytest.raises(DataError, match="split='test'"):
        build_loader(DataConfig(), tok, seq_len=8, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0, split="test")


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    for name in ("no-such-tokenizer", str(tmp_path / "missing_dir"), "some-org/not-downloaded-tok"):
        with pytest.raises(DataError, match=r"unknown tokenizer.*" + name.split("/")[-1] + r".*Accepted: 'embedded'"):
            load_tokenizer(DataConfig(tokenizer=name))
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(DataError, match="not a tokenizer.json"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "vocab.txt")))


def test_tokenizer_from_dir_and_json_file(tok):
    tdir = embedded.embedded_tokenizer_dir()
    from_dir = load_tokenizer(DataConfig(tokenizer=str(tdir)))
    from_json = load_tokenizer(DataConfig(tokenizer=str(tdir / "tokenizer.json")))
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    ids = tokenize_documents(tok, [text])[0]
    for t in (from_dir, from_json):
        assert t.eos_token_id == tok.eos_token_id
        assert np.array_equal(tokenize_documents(t, [text])[0], ids)


# ---- embedded ---------------------------------------------------------------------------------------
def test_embedded_tokenizer_and_corpus(tok):
    from transformers import AutoTokenizer

    assert len(tok) == EMBEDDED_VOCAB_SIZE == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == embedded.EMBEDDED_EOS_ID
    assert tok.pad_token_id == embedded.EMBEDDED_PAD_ID and tok.bos_token_id == tok.eos_token_id
    for text in ("import os\n\nclass A:\n\tpass\n", "naïve café — 日本語 🙂", "  leading  spaces  "):
        assert tok.decode(tokenize_documents(tok, [text], add_eos=False)[0]) == text
    root = embedded.ensure_embedded()
    meta = json.loads((root / "meta.json").read_text())
    assert meta["documents"] > 100 and meta["bytes"] <= embedded.CORPUS_MAX_BYTES
    with open(root / embedded.CORPUS_FILE) as f:
        paths = [json.loads(line)["path"] for line in f]
    assert paths == sorted(paths) and len(paths) == meta["documents"]
    # A sample of the whole library, not a prefix in path order: a third or more of it past "m".
    assert sum(p >= "m" for p in paths) >= len(paths) / 3
    with open(root / embedded.CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f]
    # No generated tables: codec maps (decoding_table = ('\x00' ...)), entity and stringprep tables.
    assert not any("decoding_table" in t for t in texts)
    assert not {"html/entities.py", "stringprep.py", "encodings/cp437.py", "encodings/aliases.py"} & set(paths)
    escapes = sum(len(re.findall(r"\\x[0-9a-fA-F]{2}", t)) for t in texts)
    assert escapes < sum(map(len, texts)) / 4096  # fewer than one '\xNN' per 4 KB
    auto = AutoTokenizer.from_pretrained(str(root / embedded.TOKENIZER_DIR))
    assert auto.encode("x = 1", add_special_tokens=False) == tok.encode("x = 1", add_special_tokens=False)
    # Python source compresses well with its own BPE: a few bytes per token.
    text = (root / embedded.CORPUS_FILE).read_text()[:20000]
    assert len(text) / len(tokenize_documents(tok, [text], add_eos=False)[0]) > 2.5


def test_generated_sources_are_recognised():
    from minimax_train.data.stdlib_corpus import is_generated

    code = 'def area(w, h):\n    """Width times height."""\n    return w * h  # 2 args\n\n' * 30
    codec = (
        "decoding_table = (\n" + "".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> CONTROL\n" for i in range(256)) + ")\n"
    )
    dump = "aliases = {\n" + "".join(f"    'name{i}': 'value{i}',\n" for i in range(300)) + "}\n"
    numbers = "TABLE = [" + ", ".join(str(i * 7919 % 65536) for i in range(2000)) + "]\n" + code[:300]
    assert not is_generated("shapes.py", code)
    assert is_generated("cp999.py", codec) and is_generated("aliases.py", dump) and is_generated("t.py", numbers)
    assert is_generated("gen.py", "# This file is generated by mkthing.py. DO NOT EDIT.\n" + code)
    assert is_generated("_sysconfigdata__linux.py", code)  # by name


def test_embedded_build_is_atomic_under_races(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "EMBEDDED_VOCAB_SIZE", 300)  # tiny tokenizer: the race, not the size
    docs = [(f"m{i}.py", f"def f{i}(x):\n    return x * {i}\n") for i in range(20)]
    target = tmp_path / "embedded-test"
    errors = []

    def build():
        try:
            embedded._build(target, docs, "digest")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == ["embedded-test"]  # no temp dirs left behind
    assert json.loads((target / "meta.json").read_text())["documents"] == 20
    assert (target / embedded.TOKENIZER_DIR / "tokenizer.json").exists()
