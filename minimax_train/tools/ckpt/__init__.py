"""Checkpoint tools (tools/ckpt.py): inspect, convert, export-hf, import-hf; the command line and what each
command does are described in cli.py."""

from __future__ import annotations

from minimax_train.tools.ckpt.cli import build_parser, main
from minimax_train.tools.ckpt.convert import check_target_layout, convert, load_full_state
from minimax_train.tools.ckpt.errors import CkptToolError
from minimax_train.tools.ckpt.hf import export_hf, import_hf
from minimax_train.tools.ckpt.inspection import format_inspect, inspect_checkpoint, read_config, tensor_metadata

__all__ = [
    "CkptToolError",
    "build_parser",
    "check_target_layout",
    "convert",
    "export_hf",
    "format_inspect",
    "import_hf",
    "inspect_checkpoint",
    "load_full_state",
    "main",
    "read_config",
    "tensor_metadata",
]
