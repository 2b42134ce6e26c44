"""`python -m minimax_train.train [overrides]`: the Hydra entry point (also under torchrun / srun), on the
config tree that minimax_train.conf_tree finds."""

from __future__ import annotations

import logging
import os
import sys

from minimax_train.conf_tree import ConfTreeNotFound, conf_dir

log = logging.getLogger("minimax_train.train")


def _non_main_rank_overrides(argv: list[str]) -> list[str]:
    """Under torchrun only rank 0 owns the Hydra run dir (its config, log and metrics); other ranks write
    nothing there and receive rank 0's run dir after the process group starts."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    extra = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    if not any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv):
        extra.append("hydra.run.dir=.")  # do not create a second (timestamped) dir
    return extra


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from minimax_train.config import to_job_config
    from minimax_train.errors import USER_ERRORS, report
    from minimax_train.train.loop import train

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        job = to_job_config(cfg)
        logging.getLogger("minimax_train").setLevel(job.logging.level)
        result = train(job, run_dir)
    except USER_ERRORS as e:
        log.error("%s", e)  # into train.log as well
        raise SystemExit(report("minimax_train", e)) from None
    if result.preempted:
        log.warning("preempted at step %d; resume by starting the same command again", result.step)


def main() -> None:
    import hydra

    from minimax_train.config import register_configs

    register_configs()
    sys.argv += _non_main_rank_overrides(sys.argv[1:])
    try:
        config_path = conf_dir()
    except ConfTreeNotFound as e:
        from minimax_train.errors import report

        raise SystemExit(report("minimax_train", e)) from None
    entry = hydra.main(config_path=config_path, config_name="config", version_base=None)(_task)
    entry()
