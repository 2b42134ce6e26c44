#!/usr/bin/env python
"""Plot runs' metrics.jsonl as PNG charts (`tools/plot_metrics.py --help`). The logic lives in
minimax_train/tools/plots.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimax_train.tools.plots import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
