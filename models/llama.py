"""LLaMA decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention via SDPA, untied head) and its causal LM loss.

Numerics follow Hugging Face's LlamaForCausalLM (fp32 RMSNorm, rotate_half RoPE) so that a checkpoint exports
to transformers by renaming keys only (`to_hf_state_dict`, `hf_config_dict`).
Building under `torch.device("meta")` allocates nothing; `to_empty(device=...)` + `init_weights()` then gives
exactly the weights a plain build would give under the same seed (the trainer relies on this for FSDP2).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.loss import linear_cross_entropy


@dataclass
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None  # None = n_heads; fewer = grouped-query attention
    intermediate_size: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                "need dim % n_heads == 0, n_heads % n_kv_heads == 0 and an even head dim; got "
                f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the gain, exactly as HF does, so bf16 runs export faithfully.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's non-interleaved RoPE pairing (i, i + d/2): q/k weights need no permutation on export."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim] in fp32 (positions up to 2048+ need fp32 angles)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of [B, H, T, head_dim] queries, keys and values: torch picks the fused kernel."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, attend: AttentionFn = causal_sdpa):
        super().__init__()
        self.attend = attend
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # HF applies RoPE in the activation dtype
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:  # kv head j serves query heads j*rep..(j+1)*rep-1, as repeat_kv
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = self.attend(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, attend: AttentionFn = causal_sdpa):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attend)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """`attend`: the causal attention function (the memory planner passes the kernel a real run uses, since on the
    meta device torch would pick its unfused path)."""

    def __init__(self, cfg: LlamaConfig, attend: AttentionFn = causal_sdpa):
        super().__init__()
        self.cfg = cfg
        device = torch.empty(0).device  # the caller's default device (honours `with torch.device(...)`)
        # Build on meta, then materialize: the default per-layer inits would be overwritten by init_weights
        # anyway, and skipping them keeps the RNG stream identical to the meta + to_empty + init_weights path.
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(TransformerBlock(cfg, attend) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = OutputHead(cfg.dim, cfg.vocab_size, bias=False)
            cos, sin = rope_cache(cfg)
        # Non-persistent: derived from the config, so never in checkpoints; recomputed by init_weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter in module order and recompute the RoPE cache (after `to_empty`)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        cos, sin = rope_cache(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] (T <= max_seq_len) -> logits [B, T, vocab] in the activation dtype; with targets [B, T],
        the mean cross entropy instead (fp32 scalar; the logits are never materialized: models/loss.py)."""
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h), targets)


class OutputHead(nn.Linear):
    """The untied output layer; given targets it returns the loss without materializing the logits. A module of
    its own (not the root's weight read directly) so that engines which gather a layer's parameters around its
    forward (DeepSpeed ZeRO-3) gather it."""

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        return linear_cross_entropy(h.flatten(0, -2), self.weight, targets.flatten())


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a packed batch [B, T+1] (inputs batch[:, :-1], targets batch[:, 1:]),
    computed in fp32 whatever the activation dtype."""
    return model(batch[:, :-1], targets=batch[:, 1:])


_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_BLOCK = {
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    if name in _HF_TOP:
        return _HF_TOP[name]
    parts = name.split(".")
    module = ".".join(parts[2:-1])
    if len(parts) < 4 or parts[0] != "layers" or module not in _HF_BLOCK:
        raise KeyError(f"no transformers name for parameter {name!r}")
    return f"model.layers.{parts[1]}.{_HF_BLOCK[module]}.{parts[-1]}"


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our state dict to transformers' LlamaForCausalLM names (tensors are shared, not copied)."""
    return {_hf_name(name): tensor for name, tensor in sd.items()}


def hf_config_dict(cfg: LlamaConfig) -> dict:
    """The config.json fields of the equivalent transformers LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
