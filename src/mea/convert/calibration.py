"""Calibration statistics: the second moment of each layer's attention input on real text.

k_proj and v_proj of a layer read the same input (the output of ``input_layernorm``), so one
(D, D) matrix C = sum_n x_n x_n^T per layer gives the key and value errors of any fit on that
text exactly, and the activation-aware fit (``heads.fit_components(init="activation")``).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from ..models.transformer import Transformer


@torch.no_grad()
def input_covariances(model: Transformer, batches: Iterable[Tensor], layers: Optional[list[int]] = None,
                      progress: bool = True) -> tuple[list[Optional[Tensor]], int]:
    """Per-layer C = X^T X (float64, on CPU) of the attention inputs over ``batches`` of token ids.

    Args:
        model: the original (unconverted) model: its activations are the fit's targets.
        batches: token-id tensors (B, L), each row one window of text.
        layers: layers to collect (default all); the others get ``None``.
        progress: show a tqdm bar.

    Returns:
        (covariances, n_tokens).
    """
    from tqdm.auto import tqdm

    n_layers = model.config.n_layers
    wanted = set(range(n_layers) if layers is None else layers)
    covs: list[Optional[Tensor]] = [None] * n_layers
    device = next(model.parameters()).device
    hooks = []

    def make_hook(i: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            c = (x.T @ x).cpu()
            covs[i] = c if covs[i] is None else covs[i] + c
        return hook

    for i, layer in enumerate(model.model.layers):
        if i in wanted:
            hooks.append(layer.self_attn.register_forward_pre_hook(make_hook(i)))
    was_training = model.training
    model.eval()
    n_tokens = 0
    try:
        for ids in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            ids = ids.to(device)
            # Only the attention inputs are needed: run the layers, skip the vocabulary projection.
            model.hidden_states(ids)
            n_tokens += ids.numel()
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return covs, n_tokens
