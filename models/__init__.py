"""Model definitions: LLaMA, its loss and its named sizes."""

from models.llama import Llama, LlamaConfig, causal_lm_loss
from models.registry import MODEL_SIZES, flops_per_token, model_config, num_params

__all__ = [
    "MODEL_SIZES",
    "Llama",
    "LlamaConfig",
    "causal_lm_loss",
    "flops_per_token",
    "model_config",
    "num_params",
]
