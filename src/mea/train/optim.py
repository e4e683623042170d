"""AdamW with decoupled weight decay on matrices only."""
from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

# Mixing matrices start at identity/replication: decaying them pulls toward zero, not toward the
# initialization, so they are exempt unless asked for.
_MIXING = ("k_mix", "v_mix", "pre_mix", "post_mix")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: decayed matrices, and the rest (norms, biases, lambdas, mixing) without decay.

    With ``cfg.mixing_lr_mult != 1`` the mixing matrices form a third group (decayed per
    ``cfg.decay_mixing``) whose ``lr_mult`` scales the scheduled lr; every group carries an ``lr_mult``
    (1.0 but for that one). With the multiplier at 1 the layout is the two groups it always was, so
    optimizer states of earlier checkpoints still load.
    """
    from ..layers.norm import HeadNorm, RMSNorm

    # The head norm's weight is (h, d): exempt norms by module type, not by dimension.
    norm_params = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, HeadNorm)) for p in m.parameters()}
    separate_mix = cfg.mixing_lr_mult != 1.0
    decay, no_decay, mixing = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_mix = name.split(".")[-1] in _MIXING
        if is_mix and cfg.freeze_mixing:  # kept as it starts (GQA healed as GQA)
            continue
        if is_mix and separate_mix:
            mixing.append(p)
        elif p.dim() >= 2 and id(p) not in norm_params and not (is_mix and not cfg.decay_mixing):
            decay.append(p)
        else:  # norms, biases, lambdas, (mixing)
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if mixing:  # no empty group: a model without mixing (mha, gqa, diff) keeps the two-group layout
        groups.append({"params": mixing, "weight_decay": cfg.weight_decay if cfg.decay_mixing else 0.0,
                       "lr_mult": cfg.mixing_lr_mult})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg), **kw)
