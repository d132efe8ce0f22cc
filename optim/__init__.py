"""Optimizers: the matrix rules of docs/optimizers.md with AdamW for the routed-out params.

Every class is a torch.optim.Optimizer; on a plain list of 2-D params its own rule applies to all of them,
and param groups with `algorithm="adamw"` are stepped by torch's AdamW inside the same object.
`build_optimizer(cfg, model)` routes a model's parameters and builds one by name. Each rule declares its options
(`options`, optim/options.py) and its defaults' provenance; `optim.reference.options_table(cls)` prints them, and
docs/optimizers.md holds those tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from optim.adamw import AdamW
from optim.auon import AuON, HybridAuON
from optim.base import MatrixOptimizer, step_params
from optim.health import track_health
from optim.muon import Muon
from optim.normuon import NorMuon
from optim.options import check_config
from optim.routing import ADAMW, is_adamw_group, route_parameters
from optim.sinkgd import SinkGD
from optim.swan import SWAN

OPTIMIZERS: dict[str, type[MatrixOptimizer]] = {
    "swan": SWAN,
    "sinkgd": SinkGD,
    "normuon": NorMuon,
    "auon": AuON,
    "hybrid_auon": HybridAuON,
    "muon": Muon,
}
# Every name `optim.name` accepts: the AdamW baseline and the matrix rules.
OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", *OPTIMIZERS)
# Every config key that sets a matrix rule's option (optim.<key>; None = the rule's default), from the rules'
# own declarations (optim/options.py).
RULE_OPTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(option.key for cls in OPTIMIZERS.values() for option in cls.options)
)


def check_options(cfg: Any) -> None:
    """ValueError naming `optim.<key>` for a rule option `cfg.name` does not take or a value it does not allow
    (cfg: the trainer's OptimConfig). The config loader calls it, so a bad option never reaches a run."""
    if cfg.name not in OPTIMIZER_NAMES:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    rule = OPTIMIZERS.get(cfg.name)
    check_config(cfg.name, rule.options if rule else (), RULE_OPTIONS, cfg)


def _rule_kwargs(cfg: Any, rule: type[MatrixOptimizer]) -> dict[str, Any]:
    """The constructor arguments of `rule` that the config sets."""
    return {o.arg: getattr(cfg, o.key) for o in rule.options if getattr(cfg, o.key, None) is not None}


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `model`'s trainable parameters (cfg: the trainer's OptimConfig).

    "adamw": torch.optim.AdamW over all parameters with lr, (beta1, beta2), eps, weight_decay; with adamw_lr or
    adamw_weight_decay set, two groups as the matrix optimizers have (hidden matrices at lr / weight_decay, the
    rest at adamw_lr / adamw_weight_decay). Otherwise the
    matrix rule over route_parameters(model)'s hidden matrices (lr, weight_decay and the set rule options),
    plus an algorithm="adamw" group for the rest (adamw_lr / adamw_weight_decay, None = lr / weight_decay).
    """
    check_options(cfg)
    betas = (cfg.beta1, cfg.beta2)
    rest_lr = cfg.lr if cfg.adamw_lr is None else cfg.adamw_lr
    rest_wd = cfg.weight_decay if cfg.adamw_weight_decay is None else cfg.adamw_weight_decay
    if cfg.name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.adamw_lr is None and cfg.adamw_weight_decay is None:
            return AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        # The same two lrs the matrix optimizers have: hidden matrices at lr, embedding, head, norms at adamw_lr
        # (a fair baseline tunes both, or the comparison measures the embedding lr instead of the matrix rule).
        matrices, others = route_parameters(model)
        split = [{"params": matrices}, {"params": others, "lr": rest_lr, "weight_decay": rest_wd}]
        return AdamW(
            [g for g in split if g["params"]],
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    cls = OPTIMIZERS[cfg.name]
    kwargs = _rule_kwargs(cfg, cls)
    matrices, others = route_parameters(model)
    groups: list[dict[str, Any]] = [{"params": matrices}] if matrices else []
    if others:
        groups.append(
            {
                "params": others,
                "algorithm": ADAMW,
                "lr": rest_lr,
                "betas": betas,
                "eps": cfg.eps,
                "weight_decay": rest_wd,
            }
        )
    optimizer = cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    optimizer.overlap_buckets = getattr(cfg, "overlap_buckets", optimizer.overlap_buckets)
    optimizer.ns_tf32 = getattr(cfg, "ns_tf32", optimizer.ns_tf32)
    return optimizer


__all__ = [
    "OPTIMIZERS",
    "AdamW",
    "OPTIMIZER_NAMES",
    "SWAN",
    "AuON",
    "HybridAuON",
    "MatrixOptimizer",
    "Muon",
    "NorMuon",
    "SinkGD",
    "build_optimizer",
    "check_options",
    "is_adamw_group",
    "route_parameters",
    "step_params",
    "track_health",
]
