"""Tools for planning and operating runs; each has a command in tools/ (run it with --help):

- planner/       tools/plan_layout.py   parallel layouts, memory per GPU, step time and MFU
- memcheck.py    (plan_layout --validate-cpu)  measured peak memory of CPU training steps vs the planner
- prepare.py     tools/prepare_data.py  corpus -> Megatron .bin/.idx or Arrow, in parallel, with a summary
- ckpt/          tools/ckpt.py          inspect / convert / export-hf / import-hf checkpoints
- plots.py       tools/plot_metrics.py  metrics.jsonl of one or several runs -> PNG charts
- sample.py      (launch/quickstart.sh)  a sample of an HF export via transformers' generate, and its stats
- spawn.py       (tests, benchmarks, memcheck)  local multi-process torch.distributed jobs, free ports
"""
