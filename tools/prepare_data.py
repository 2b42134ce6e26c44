#!/usr/bin/env python
"""Tokenise a corpus into a Megatron indexed dataset (.bin/.idx) or an Arrow dataset: `tools/prepare_data.py
--help`. The logic lives in minimax_train/tools/prepare.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimax_train.tools.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
