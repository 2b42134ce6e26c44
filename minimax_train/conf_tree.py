"""The Hydra config tree (conf/): where it is, and the JobConfig a set of overrides composes from it.

conf/ lives at the repository top level; it is found relative to this package (editable installs),
or inside the package as minimax_train/conf when a wheel ships it there, or at $MINIMAX_TRAIN_CONF."""

from __future__ import annotations

import os
from pathlib import Path


class ConfTreeNotFound(FileNotFoundError):
    """No conf/config.yaml in any of the places the config tree may be."""


def conf_dir() -> str:
    """The config tree's directory (the one holding config.yaml)."""
    env = os.environ.get("MINIMAX_TRAIN_CONF")
    pkg = Path(__file__).resolve().parent  # minimax_train/
    candidates = ([Path(env)] if env else []) + [pkg.parent / "conf", pkg / "conf"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return str(c)
    raise ConfTreeNotFound(
        f"cannot find the config tree (conf/config.yaml); looked in {', '.join(str(c) for c in candidates)}. "
        f"Set MINIMAX_TRAIN_CONF to the conf directory."
    )


def compose_job(*overrides: str):
    """The JobConfig that `python -m minimax_train.train *overrides` would run (Hydra compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from minimax_train.config import register_configs, to_job_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_job_config(cfg)
