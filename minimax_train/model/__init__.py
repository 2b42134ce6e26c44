from .config import FULL, LINEAR, ModelConfig
from .transformer import CausalLMOutput, MiniMaxForCausalLM, MiniMaxModel

__all__ = ["ModelConfig", "MiniMaxForCausalLM", "MiniMaxModel", "CausalLMOutput", "FULL", "LINEAR"]
