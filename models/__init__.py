"""Model definitions: LLaMA and its named sizes."""

from models.llama import Llama, LlamaConfig
from models.registry import MODEL_SIZES, flops_per_token, model_config, num_params

__all__ = ["MODEL_SIZES", "Llama", "LlamaConfig", "flops_per_token", "model_config", "num_params"]
