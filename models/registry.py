"""Named model sizes (the GaLore benchmark shapes), exact parameter counts and training FLOPs per token."""

from models.llama import LlamaConfig

# vocab_size None means "taken from the data" (the tokenizer's size), passed to model_config.
MODEL_SIZES: dict[str, dict] = {
    "llama_tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=176, vocab_size=None),
    # A few million parameters: the CPU convergence benchmark's model (benchmarks/convergence.py).
    "llama_3m": dict(dim=192, n_layers=6, n_heads=6, intermediate_size=512, vocab_size=None),
    "llama_60m": dict(dim=512, n_layers=8, n_heads=8, intermediate_size=1376),
    "llama_130m": dict(dim=768, n_layers=12, n_heads=12, intermediate_size=2048),
    "llama_350m": dict(dim=1024, n_layers=24, n_heads=16, intermediate_size=2736),
    "llama_1b": dict(dim=2048, n_layers=24, n_heads=32, intermediate_size=5461),
    "llama_7b": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008, max_seq_len=2048),
    # llama_tiny at 3x the width (same depth, head dim 16, MLP ratio 2.75): the convergence benchmark's
    # width-transfer pair (benchmarks/convergence.py --models llama_tiny,llama_tiny_w192).
    "llama_tiny_w192": dict(
        dim=192, n_layers=2, n_heads=12, n_kv_heads=6, intermediate_size=528, vocab_size=None
    ),
}
_DEFAULTS = dict(n_kv_heads=None, vocab_size=32000, max_seq_len=256)


def model_config(name: str, vocab_size: int | None = None, max_seq_len: int | None = None) -> LlamaConfig:
    """The named size's config; a given vocab_size / max_seq_len overrides the registry's."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_SIZES)}")
    fields = {**_DEFAULTS, **MODEL_SIZES[name]}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    if max_seq_len is not None:
        fields["max_seq_len"] = max_seq_len
    if fields["vocab_size"] is None:
        raise ValueError(f"model {name!r} takes its vocab_size from the data: pass vocab_size")
    return LlamaConfig(**fields)


def _matmul_params(cfg: LlamaConfig) -> int:
    """Weights that take part in a matmul: attention, MLP and the output head (not the embedding lookup)."""
    attn = 2 * cfg.dim * cfg.n_heads * cfg.head_dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
    mlp = 3 * cfg.dim * cfg.intermediate_size
    return cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size


def num_params(cfg: LlamaConfig, embeddings: bool = True) -> int:
    """Exact parameter count of Llama(cfg); embeddings=False leaves out the token embedding (the untied
    output head is always counted)."""
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    return _matmul_params(cfg) + norms + (cfg.vocab_size * cfg.dim if embeddings else 0)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, for MFU: 6 * N + 12 * n_layers * dim * seq_len.

    N counts the matmul weights (attention, MLP, output head; not the embedding lookup nor norm gains):
    each costs 2 FLOPs per token forward and 4 backward. The second term is attention's QK^T and AV matmuls
    over the full (unmasked) sequence. This is the convention of PaLM (Chowdhery et al. 2022, appendix B)
    and of nanoGPT's `estimate_mfu`, so MFU numbers compare with theirs.
    """
    return 6.0 * _matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len
