"""Model presets: a conf/model name, a model yaml file or a transformers config.json -> ModelConfig."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from minimax_train.conf_tree import ConfTreeNotFound, conf_dir
from minimax_train.model.config import ModelConfig
from minimax_train.tools.planner.inputs import PlanError


def conf_model_dir() -> Path:
    """conf/model of the config tree (minimax_train.conf_tree); PlanError when there is none."""
    try:
        return Path(conf_dir()) / "model"
    except ConfTreeNotFound as e:
        raise PlanError(str(e)) from None


def preset_names() -> list[str]:
    try:
        d = conf_model_dir()
    except PlanError:
        return []
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_model_config(name: str) -> ModelConfig:
    """A preset name (conf/model/<name>.yaml), a model yaml file, or a transformers config.json (or its
    directory). Raises PlanError naming the accepted forms."""
    p = Path(name)
    try:
        if p.is_dir() and (p / "config.json").is_file():
            p = p / "config.json"
        if p.is_file() and p.suffix == ".json":
            return ModelConfig.from_hf_dict(json.loads(p.read_text()))
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            return _model_from_yaml(p)
        if "/" not in name and name in preset_names():
            return _model_from_yaml(conf_model_dir() / f"{name}.yaml")
    except PlanError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise PlanError(f"model {name!r}: {e}") from None
    raise PlanError(
        f"unknown model preset {name!r}: use one of {', '.join(preset_names()) or '(none found)'}, "
        f"a model .yaml file or a transformers config.json"
    )


def _model_from_yaml(path: Path) -> ModelConfig:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: not a mapping of model fields")
    raw = raw.get("model", raw)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PlanError(f"{path}: unknown model field(s) {', '.join(unknown)}")
    return ModelConfig(**raw)
