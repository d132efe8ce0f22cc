"""The output layer and the cross-entropy over the vocabulary, fused and cut into row chunks.

Why: the plain way materializes the logits [rows, vocab] in the activation dtype, an fp32 copy of them for the
loss, and the fp32 softmax autograd keeps for the backward: at llama_350m's micro batch of 64 x 256 tokens and a
32000-token vocabulary that is 1 GiB of bf16 logits, 2 of fp32 and 2 of softmax per micro batch (the planner's
forward/backward peak: 23.0 GiB with them, 18.1 without), for a layer that holds a tenth of the FLOPs. Here
each chunk of rows computes its logits, its part of the loss and, at once, its part of both gradients
(dlogits = (softmax - onehot) / rows), then drops the logits: what the backward keeps is the two gradients,
[rows, dim] and [vocab, dim]. The numbers are those of F.cross_entropy(hidden @ weight.T) in the same dtypes
(logits rounded to the activation dtype, softmax and loss in fp32 (float64 for a float64 model), the gradient of
the logits cast back for the matrix products), except that the weight gradient's chunks are summed in fp32 before
one final rounding.
Without grad (evaluation), only the loss is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_LOGIT_BYTES = 256 * 2**20  # fp32 logits of one chunk; its rows = this / (4 x vocab), at least 1


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None) -> Tensor:
    """Mean cross entropy of the logits hidden @ weight.T [N, V] against targets [N] (an fp32 scalar, float64 for
    float64 inputs); hidden
    [N, D], weight [V, D]; `rows` per chunk (default: chunk_rows(V))."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows or chunk_rows(weight.shape[0]))


def _chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """A chunk's logits in the loss's dtype: fp32 for bf16 and fp32 activations, float64 for float64."""
    return (h @ weight.t()).to(torch.promote_types(h.dtype, torch.float32))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        n = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_weight else None
        for start in range(0, n, rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = _chunk_logits(h, weight)
            lse = logits.logsumexp(dim=-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if not (want_hidden or want_weight):
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
            probs.scatter_add_(1, t.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
            dlogits = probs.div_(n).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(dlogits, weight, out=grad_hidden[start : start + rows])
            if grad_weight is not None:
                grad_weight += dlogits.t() @ h
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_empty(0),
        )
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None,
            grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
        )
