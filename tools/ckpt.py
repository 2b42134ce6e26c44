#!/usr/bin/env python
"""Checkpoint tools: inspect, convert, export-hf, import-hf (`tools/ckpt.py --help`). The logic lives in
minimax_train/tools/ckpt/cli.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimax_train.tools.ckpt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
