"""Which parameters take the matrix rule and which take AdamW (one function, shared by every optimizer)."""

from __future__ import annotations

from torch import Tensor, nn

HEAD_NAMES = ("output", "lm_head")
ADAMW = "adamw"  # the `algorithm` of the param groups AdamW steps inside a matrix optimizer


def is_adamw_group(group: dict) -> bool:
    """Whether a param group is stepped by AdamW: a matrix optimizer's algorithm="adamw" group, or any group of an
    optimizer that has no matrix rule (torch's AdamW keeps no `algorithm` key). The one test for it."""
    return group.get("algorithm", ADAMW) == ADAMW


def route_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(hidden matrices, AdamW params) of a model, each trainable parameter exactly once.

    Hidden matrices are the weights of nn.Linear modules (attention q/k/v/o, MLP gate/up/down), except the
    output head (a module named `output` or `lm_head`). Everything else goes to AdamW: token embedding,
    head, norm gains, biases. Works through activation-checkpoint / torch.compile wrappers (they keep the
    Linear modules and only add name components) and on FSDP2 models (params are DTensors; FSDP2's Linear
    classes subclass nn.Linear).
    """
    hidden = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in HEAD_NAMES:
            hidden.add(id(module.weight))
    matrices: list[Tensor] = []
    others: list[Tensor] = []
    for p in model.parameters():  # deduplicates shared (tied) parameters
        if p.requires_grad:
            (matrices if id(p) in hidden else others).append(p)
    return matrices, others
