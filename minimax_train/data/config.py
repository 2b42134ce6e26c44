"""Data configuration: where documents come from, how they are tokenised and held out.

Plain dataclasses with OmegaConf-friendly types (no unions except Optional), so the trainer's
Hydra schema can embed DataConfig as is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from minimax_train.errors import MinimaxError

SOURCE_KINDS = ("embedded", "jsonl", "parquet", "text", "hf", "megatron")
TEXT_SAMPLE_BY = ("document", "paragraph", "line")
SPLITS = ("train", "valid")
SHUFFLE_MODES = ("samples", "documents", "none")


class DataError(MinimaxError, ValueError):
    """Bad data or data configuration: the message names the source and what was expected."""


@dataclass
class SourceConfig:
    kind: str = "embedded"  # embedded | jsonl | parquet | text | hf | megatron
    # file/dir/glob for jsonl/parquet/text; dataset name (or local dir) for hf;
    # path prefix (no .bin/.idx) for megatron; unused for embedded.
    path: Optional[str] = None
    weight: float = 1.0
    text_key: str = "text"  # column/field holding the document text (jsonl, parquet, hf)
    split: str = "train"  # hf split name to read (local files always have one split)
    streaming: bool = False  # hf only: iterate without downloading/converting everything
    name: Optional[str] = None  # hf config name
    sample_by: str = "document"  # text files: one document per file, paragraph or line


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    # "embedded", a local tokenizer dir (AutoTokenizer), a tokenizer.json file, or a hub id already
    # in the local Hugging Face cache (never downloaded at run time).
    tokenizer: str = "embedded"
    valid_fraction: float = 0.01  # documents held out by a stable hash of their content
    max_bad_lines: int = 100  # malformed records skipped and counted; more than this is an error
    add_eos: bool = True  # append the tokenizer's EOS to every text document
    # Train split order, drawn from train.seed every epoch. samples: documents shuffled, packed into
    # rows of seq_len, the rows shuffled (Megatron's GPTDataset order); documents: documents shuffled,
    # rows in packing order; none: storage order. The valid split is always in storage order.
    shuffle: str = "samples"
    shuffle_buffer: int = 10000  # streaming hf sources: size of the document shuffle buffer
    # shuffle=samples: rows are shuffled within spans of this many tokens of a source's packed stream
    # (a whole epoch when it is smaller); a span's rows are held in memory (4 bytes a token).
    shuffle_span_tokens: int = 1 << 24
    tokenize_batch: int = 64  # documents tokenised per call (the fast tokenizer runs a batch in parallel)
    cache_dir: Optional[str] = None  # datasets' cache for parquet/text/hf (None: datasets' default)
    # Mix of the train split by document length (tokens, EOS included): [[upper_bound, weight], ...] with
    # increasing bounds (exclusive; null: no bound, last only), e.g. [[8192, 0.3], [131072, 0.7], [null, 0]]
    # gives 30% of the rows from documents < 8K, 70% from 8K..128K, none from longer ones. Each bucket
    # of each source is packed on its own; weights multiply the sources'. null: no length mix.
    length_buckets: Optional[list[list[Any]]] = None  # entries: int or null, float


def length_bucket_ranges(cfg: DataConfig) -> list[tuple[int, Optional[int], float]]:
    """(lower bound, upper bound or None, weight) of every data.length_buckets entry, in order; one
    unbounded bucket of weight 1 without length_buckets. Raises DataError naming the entry."""
    if cfg.length_buckets is None:
        return [(0, None, 1.0)]
    if not cfg.length_buckets:
        raise DataError("data.length_buckets is empty: give [[upper_bound, weight], ...] or null")
    out, lo = [], 0
    for i, entry in enumerate(cfg.length_buckets):
        key = f"data.length_buckets[{i}]"
        if len(entry) != 2:
            raise DataError(f"{key}={list(entry)!r}: expected [upper_bound_tokens (or null), weight]")
        hi, w = entry
        if hi is not None:
            if not isinstance(hi, (int, float)) or int(hi) != hi or hi <= lo:
                raise DataError(f"{key}: upper bound {hi!r} must be a whole number above the previous one ({lo})")
            hi = int(hi)
        elif i != len(cfg.length_buckets) - 1:
            raise DataError(f"{key}: only the last bucket may have no upper bound (null)")
        if not isinstance(w, (int, float)) or not w >= 0:
            raise DataError(f"{key}: weight {w!r} must be >= 0")
        out.append((lo, hi, float(w)))
        lo = hi if hi is not None else lo
    if not sum(w for _, _, w in out) > 0:
        raise DataError("data.length_buckets: the weights sum to 0; give at least one bucket a weight > 0")
    return out


def validate_data_config(cfg: DataConfig) -> None:
    """Raise DataError naming the offending key and the allowed values."""
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one source")
    for i, s in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if s.kind not in SOURCE_KINDS:
            raise DataError(f"{key}.kind={s.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if s.kind != "embedded" and not s.path:
            raise DataError(f"{key}.path is required for kind={s.kind!r}")
        if not (s.weight > 0):
            raise DataError(f"{key}.weight={s.weight!r} must be > 0")
        if s.sample_by not in TEXT_SAMPLE_BY:
            raise DataError(f"{key}.sample_by={s.sample_by!r} is not one of {', '.join(TEXT_SAMPLE_BY)}")
        if s.streaming and s.kind != "hf":
            raise DataError(f"{key}.streaming=True is only supported for kind='hf' (got kind={s.kind!r})")
    if not (0.0 <= cfg.valid_fraction < 1.0):
        raise DataError(f"data.valid_fraction={cfg.valid_fraction!r} must be in [0, 1)")
    if cfg.max_bad_lines < 0:
        raise DataError(f"data.max_bad_lines={cfg.max_bad_lines!r} must be >= 0")
    if cfg.shuffle not in SHUFFLE_MODES:
        raise DataError(f"data.shuffle={cfg.shuffle!r} is not one of {', '.join(SHUFFLE_MODES)}")
    if cfg.shuffle_span_tokens < 1:
        raise DataError(f"data.shuffle_span_tokens={cfg.shuffle_span_tokens!r} must be >= 1")
    if cfg.shuffle_buffer < 1:
        raise DataError(f"data.shuffle_buffer={cfg.shuffle_buffer!r} must be >= 1")
    if cfg.tokenize_batch < 1:
        raise DataError(f"data.tokenize_batch={cfg.tokenize_batch!r} must be >= 1")
    length_bucket_ranges(cfg)
