"""LLaMA model: logit parity with transformers, exact parameter counts, init, meta-device build, causality."""

import pytest
import torch

from models import MODEL_SIZES, Llama, LlamaConfig, flops_per_token, model_config, num_params
from models.llama import RMSNorm, hf_config_dict, to_hf_state_dict

B, T = 2, 16
# Our logits against transformers' (another implementation: fused attention, other operation orders), fp32: a logit
# (|.| < 1) is a dot product of 64 terms of the final normalized hidden state (entries ~1) with a row of the head
# (std 0.02), sum |a_i b_i| ~ 1, so it can round by up to 64 u32 = 4e-6 (the recursive-summation bound; u32 = 6e-8)
# between two implementations, and the hidden state feeds in errors of the same relative size from the blocks before
# it. 1e-5 is that bound; blocked sums give ~2e-7 in practice, a wrong RoPE layout or weight mapping 1e-2 or more.
LOGITS_ATOL = 1e-5


def tiny(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**MODEL_SIZES["llama_tiny"], "vocab_size": 128, "max_seq_len": 64, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": None, "rope_theta": 5000.0, "norm_eps": 1e-5}],
    ids=["gqa", "mha_theta5000"],
)
def test_logits_match_transformers(overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    ours = Llama(cfg).eval()
    assert (cfg.n_kv_heads < cfg.n_heads) == (overrides == {})
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation="eager")
    ).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        logits, ref = ours(tokens), hf(tokens).logits
    assert logits.shape == ref.shape == (B, T, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert ref.abs().max() > 0.1  # a real comparison, not of two near-zero tensors
    torch.testing.assert_close(logits, ref, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_in_bf16(weight_dtype):
    """Normalizing in fp32 and rounding back before the gain is what HF does; bf16 training must match it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = RMSNorm(64, eps=1e-6).to(weight_dtype)
    ref = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = (3 * torch.randn(4, 64)).bfloat16()
    out = ours(x)
    assert out.dtype == weight_dtype
    torch.testing.assert_close(out, ref(x), atol=0, rtol=0)


def test_to_hf_state_dict_rejects_unknown_names():
    with pytest.raises(KeyError, match="layers.0.attention.wz.weight"):
        to_hf_state_dict({"layers.0.attention.wz.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_num_params_is_exact(name):
    cfg = model_config(name, vocab_size=1000)
    with torch.device("meta"):
        model = Llama(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert num_params(cfg) == total
    assert num_params(cfg, embeddings=False) == total - model.tok_embeddings.weight.numel()


def test_flops_per_token_counts_matmul_weights_and_attention():
    cfg = model_config("llama_tiny", vocab_size=128)
    with torch.device("meta"):
        model = Llama(cfg)
    matmul = sum(p.numel() for p in model.parameters() if p.ndim == 2) - model.tok_embeddings.weight.numel()
    assert flops_per_token(cfg, 256) == 6 * matmul + 12 * 2 * 64 * 256
    assert flops_per_token(cfg, 512) - flops_per_token(cfg, 256) == 12 * 2 * 64 * 256


def test_model_config_overrides_and_errors():
    cfg = model_config("llama_60m")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (512, 8, 8, 8)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_seq_len) == (1376, 32000, 256)
    assert model_config("llama_7b").max_seq_len == 2048
    cfg = model_config("llama_60m", vocab_size=50257, max_seq_len=1024)
    assert (cfg.vocab_size, cfg.max_seq_len) == (50257, 1024)
    with pytest.raises(ValueError, match="llama_tiny, llama_3m, llama_60m"):
        model_config("llama_2m")
    with pytest.raises(ValueError, match="vocab_size"):
        model_config("llama_tiny")
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        tiny(n_kv_heads=3)


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_init_weights_statistics(std):
    torch.manual_seed(0)
    shape = dict(dim=512, n_layers=1, n_heads=8, n_kv_heads=8, intermediate_size=64, vocab_size=16)
    cfg = LlamaConfig(**shape, max_seq_len=8, init_std=std)
    model = Llama(cfg)
    wq = model.layers[0].attention.wq.weight
    assert wq.shape == (512, 512)
    assert abs(wq.std().item() - std) < 0.1 * std
    assert abs(wq.mean().item()) < 0.01 * std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - std) < 0.1 * std, name


def test_meta_build_then_init_weights_matches_fresh_build():
    cfg = tiny()
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    torch.manual_seed(1)
    fresh = Llama(cfg)
    with torch.device("meta"):
        model = Llama(cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    assert "rope_cos" not in model.state_dict()  # derived from the config: never checkpointed
    torch.testing.assert_close(model.rope_cos, fresh.rope_cos, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), fresh(tokens), atol=0, rtol=0)


def test_causal():
    torch.manual_seed(0)
    cfg = tiny()
    model = Llama(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    changed = tokens.clone()
    changed[:, 10] = (tokens[:, 10] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    # exact: a changed token enters earlier positions only through attention scores that the mask sets to -inf,
    # whose weights are exactly 0, and every other operation is per position (or a matmul row of its own)
    torch.testing.assert_close(after[:, :10], before[:, :10], atol=0, rtol=0)
    assert (after[:, 10:] - before[:, 10:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


def test_rejects_sequences_longer_than_max_seq_len():
    model = Llama(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
