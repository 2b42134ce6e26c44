"""Checkpoint tools: inspect, convert, export-hf, import-hf.

    tools/ckpt.py inspect CKPT [--tensors] [--json]
    tools/ckpt.py convert CKPT --out DST [--format dcp|torch|hf] [--world N --tp .. --cp .. --ep .. --etp ..]
    tools/ckpt.py export-hf CKPT --out HF_DIR [--dtype bf16]
    tools/ckpt.py import-hf HF_DIR --out CKPT_DIR [-- trainer overrides]

CKPT is one checkpoint (checkpoint.dir/step_XXXXXXXX) or a checkpoint.dir, meaning its latest complete one
(minimax_train.train.checkpoint: a torch.distributed.checkpoint (DCP) directory of {"model", "optim"}, plus
meta.pt and config.yaml).

About layouts: a DCP checkpoint stores every tensor with its global shape, split into the chunks its ranks
held; loading reshards to whatever layout the loading job has. Every layout stores every tensor under
the single-process model's key and shape (the expert gate/up weight too: expert_parallel.standard_gate_up
maps the in-memory [E, 2, I, H] form of etp > 1 to transformers' [E, 2I, H]), so resuming under a different
tp / cp / ep / etp / dp needs no conversion: start the trainer with the new parallel.* settings and the
same checkpoint.dir. What `convert` does: it checks the target layout against the model (the trainer's
resolve_layout rules plus the vocabulary / zigzag constraints) and the saved data position (the global
rows consumed must divide by the new dp), then writes a consolidated copy:
- dcp: a complete checkpoint directory (model, optimizer, meta, config with the target parallel.* set),
  written by one process into a single file set, which the trainer resumes under the target layout;
- torch: one torch.save file of the whole state ({"model": ..., "optim": ...}, full tensors);
- hf: the transformers export (same code as `export-hf` / python -m minimax_train.export).
All three hold the whole checkpoint in this process's memory.

export-hf is minimax_train.export.export. import-hf writes a transformers MiniMax directory as step 0 of
a checkpoint.dir, exactly as the trainer's CheckpointManager saves the loaded model in one process, but
tensor by tensor (minimax_train.hf.stream_import: host memory about one tensor, not the model), with fresh
AdamW state and the data loader's initial position for the job config given by the overrides
(the trainer's Hydra config, e.g. `-- data=jsonl train.seq_len=4096`): starting the trainer with
checkpoint.dir=CKPT_DIR and the same overrides resumes from those weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minimax_train.tools.ckpt.convert import convert
from minimax_train.tools.ckpt.errors import CkptToolError
from minimax_train.tools.ckpt.hf import export_hf, import_hf
from minimax_train.tools.ckpt.inspection import format_inspect, inspect_checkpoint


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="tools/ckpt.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{inspect,convert,export-hf,import-hf}")
    p = sub.add_parser("inspect", help="step, tokens seen, saving layout, config, tensor shapes")
    p.add_argument("checkpoint", help="a step_XXXXXXXX dir or a checkpoint.dir (its latest)")
    p.add_argument("--tensors", action="store_true", help="list every tensor (model and optimizer)")
    p.add_argument("--match", help="list the tensors whose name contains this")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "convert",
        help="validate a target layout and write a consolidated dcp / torch / hf copy",
        description="Validate a target parallel layout for the checkpoint's model and data position "
        "and write a consolidated copy. DCP checkpoints reshard when loaded, so the trainer "
        "can resume the original under any valid layout without this; convert changes the "
        "format.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="dcp: a checkpoint.dir; torch: a file; hf: a directory")
    p.add_argument("--format", default="dcp", choices=("dcp", "torch", "hf"))
    p.add_argument("--world", type=int, help="target world size (GPUs); validates tp/cp/ep/etp against it")
    for k in ("tp", "cp", "ep", "etp"):
        p.add_argument(f"--{k}", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="hf only: weights dtype")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("export-hf", help="transformers directory (python -m minimax_train.export)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser(
        "import-hf",
        help="transformers directory -> step 0 of a checkpoint.dir the trainer resumes",
        description="Load a transformers MiniMax directory and save it as step_00000000 of a "
        "checkpoint.dir (fresh AdamW state, the data loader at its start). Trainer "
        "overrides after `--` choose the data, optimizer and batch settings; start training "
        "with checkpoint.dir=OUT and the same overrides.",
    )
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="the checkpoint.dir to create")
    p.add_argument("--overwrite", action="store_true")
    p.usage = "tools/ckpt.py import-hf HF_DIR --out CKPT_DIR [--overwrite] [-- trainer overrides ...]"
    return ap


def main(argv=None) -> int:
    import torch

    from minimax_train.errors import USER_ERRORS, report

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:  # trainer overrides for import-hf
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    if overrides and args.cmd != "import-hf":
        print("ckpt: error: trainer overrides after -- only apply to import-hf", file=sys.stderr)
        return 2
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        if args.cmd == "inspect":
            info = inspect_checkpoint(args.checkpoint)
            if args.json:
                print(json.dumps(info, indent=1, default=str))
            else:
                print(format_inspect(info, args.tensors, args.match))
        elif args.cmd == "convert":
            for k in ("tp", "cp", "ep", "etp", "world"):
                v = getattr(args, k)
                if v is not None and v < 1:
                    raise CkptToolError(f"--{k} must be a positive integer, got {v}")
            if args.world is None and (args.tp, args.cp, args.ep) != (1, 1, 1):
                raise CkptToolError("--tp/--cp/--ep describe a target layout: give its --world (GPU count) too")
            rep = convert(
                args.checkpoint,
                args.out,
                fmt=args.format,
                world=args.world,
                tp=args.tp,
                cp=args.cp,
                ep=args.ep,
                etp=args.etp,
                dtype=dtypes.get(args.dtype),
                overwrite=args.overwrite,
            )
            if "target_layout" in rep:
                t = rep["target_layout"]
                print(
                    f"target layout valid: world {t['world']} = dp {t['dp']} x cp {t['cp']} x tp {t['tp']}; experts "
                    f"edp {t['edp']} x ep {t['ep']} x etp {t['etp']}"
                )
            print(f"wrote {rep['output']} ({rep['format']})")
        elif args.cmd == "export-hf":
            out = export_hf(
                args.checkpoint,
                args.out,
                dtype=dtypes.get(args.dtype),
                tokenizer=not args.no_tokenizer,
                overwrite=args.overwrite,
            )
            print(f"wrote {out}")
        else:
            out = import_hf(args.hf_dir, args.out, args.overrides, overwrite=args.overwrite)
            print(
                f"wrote {out}; train from it with: python -m minimax_train.train checkpoint.dir={Path(args.out)} "
                + " ".join(args.overrides)
            )
    except USER_ERRORS as e:
        return report("ckpt", e)
    return 0
