"""Data pipeline: sources, tokenisation, packing into varlen rows, blending, dp sharding, resume."""

from .batch import IGNORE_INDEX, PackedBatch
from .config import DataConfig, DataError, SourceConfig
from .embedded import EMBEDDED_VOCAB_SIZE
from .loader import PackedLoader, build_loader
from .tokenizer import load_tokenizer, tokenize_documents

__all__ = [
    "DataConfig",
    "SourceConfig",
    "DataError",
    "PackedBatch",
    "PackedLoader",
    "IGNORE_INDEX",
    "EMBEDDED_VOCAB_SIZE",
    "load_tokenizer",
    "build_loader",
    "tokenize_documents",
]
