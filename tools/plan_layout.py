#!/usr/bin/env python
"""Plan a parallel layout: memory per GPU and step time for every valid (tp, cp, ep, etp, dp, engine, stage,
activation checkpointing, micro-batch) on N GPUs. `tools/plan_layout.py --help`; the model of memory and
time is documented in minimax_train/tools/planner/ (memory.py, step_time.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimax_train.tools.planner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
