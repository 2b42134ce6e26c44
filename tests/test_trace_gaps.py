"""tools/trace_gaps.py on a hand-written trace: busy fraction and the charge of each gap."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import trace_gaps  # noqa: E402


def _x(cat, name, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


def test_gaps_are_charged_to_syncs_and_launches(tmp_path, capsys):
    events = [
        # host: aten::item (sync 100..200), then aten::mm launching kernel 2 late
        _x("cpu_op", "aten::item", 95, 110),
        _x("cuda_runtime", "cudaStreamSynchronize", 100, 100),
        _x("cpu_op", "aten::mm", 290, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 295, 5, corr=7),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 5, corr=6),
        # GPU: 0..100 busy, idle 100..210 (sync), busy 210..250, idle 250..300 (launch), busy 300..400
        _x("kernel", "k0", 0, 100, tid=7, corr=6),
        _x("kernel", "k1", 210, 40, tid=7),
        _x("kernel", "k2", 300, 100, tid=7, corr=7),
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    window, busy, idle, counts = trace_gaps.analyse(trace_gaps.load(str(path)), 5)
    assert (window, busy) == (400, 240)
    assert idle == {"sync  cudaStreamSynchronize in aten::item": 110, "launch  from aten::mm": 50}
    assert trace_gaps.main([str(path)]) == 0
    assert "GPU busy 0.2 ms (60.0%)" in capsys.readouterr().out
