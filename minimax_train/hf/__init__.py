from .convert import CheckpointError, hf_to_ours, ours_to_hf_disk
from .io import SafetensorsSource, load_hf, read_hf_config, save_hf

__all__ = [
    "load_hf",
    "save_hf",
    "read_hf_config",
    "hf_to_ours",
    "ours_to_hf_disk",
    "CheckpointError",
    "SafetensorsSource",
]
