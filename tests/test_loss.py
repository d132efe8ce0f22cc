"""The fused, chunked output layer + cross entropy (models/loss.py) equals F.cross_entropy of the full logits, loss
and both gradients, and keeps no [rows, vocab] tensor for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import Llama, causal_lm_loss, model_config
from models.loss import chunk_rows, linear_cross_entropy

# float64 throughout: a loss and its gradients are sums of ~vocab terms of size ~1, so rounding differences
# between the chunked and the whole computation are a few float64 ulps (~1e-15); 1e-12 leaves 1000x of room
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _inputs(rows: int = 37, dim: int = 16, vocab: int = 50):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    return hidden, weight, torch.randint(0, vocab, (rows,), generator=gen)


@pytest.mark.parametrize(
    "rows", [1, 5, 37, 100]
)  # one row at a time, uneven chunks, one chunk, more than all
def test_chunked_loss_and_gradients_equal_the_full_logits(rows: int) -> None:
    hidden, weight, targets = _inputs()
    expected = F.cross_entropy(hidden @ weight.t(), targets)
    (0.25 * expected).backward()  # a scaled loss, as gradient accumulation makes
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden, weight, targets, rows)
    (0.25 * loss).backward()
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(hidden.grad, want[0], **TOL)
    torch.testing.assert_close(weight.grad, want[1], **TOL)


def test_without_grad_only_the_loss_is_computed() -> None:
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 5)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets), **TOL)
    frozen = linear_cross_entropy(hidden.detach(), weight, targets, 5)  # a gradient for the weight only
    frozen.backward()
    assert weight.grad is not None and frozen.grad_fn is not None


def test_the_model_loss_keeps_no_logits_for_the_backward() -> None:
    torch.manual_seed(0)
    cfg = model_config("llama_tiny", vocab_size=512)
    model = Llama(cfg).double()
    batch = torch.randint(0, 512, (4, 33))
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = causal_lm_loss(model, batch)
    assert all(
        shape[-1] != cfg.vocab_size or len(shape) == 2 and shape[0] == cfg.vocab_size for shape in saved
    )
    assert torch.Size([cfg.vocab_size, cfg.dim]) in saved  # the head's gradient, computed in the forward
    logits = model(batch[:, :-1])
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), **TOL)


def test_a_chunk_holds_a_bounded_number_of_logits() -> None:
    assert chunk_rows(32000) == 2097  # 256 MiB of fp32 logits per chunk at llama_350m's vocabulary
    assert chunk_rows(10**12) == 1
