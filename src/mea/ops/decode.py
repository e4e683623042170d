"""MEA attention over a KV cache of component heads, with the fast path chosen per device.

The PyTorch paths in ``ops.attention`` are the reference and the CPU path. A CUDA kernel, when
present, registers itself in ``_FAST_DECODE`` and takes decoding steps (few query tokens).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .attention import mea_attention_absorbed, mea_attention_reference

# Filled by fast kernels: fn(q, k_comp, v_comp, k_mix, v_mix, mask) -> Tensor or None (declined).
_FAST_DECODE: list[Callable] = []

# Up to this many new tokens the absorbed form (read the h' stored heads once) is used; longer
# chunks (prefill) materialize the composite heads, which costs less compute at large Lq.
ABSORB_MAX_QUERIES = 16


def mea_attention_cached(q: Tensor, k_comp: Tensor, v_comp: Tensor, k_mix: Tensor, v_mix: Tensor,
                         mask: Optional[Tensor] = None) -> Tensor:
    if q.shape[2] <= ABSORB_MAX_QUERIES:
        for fn in _FAST_DECODE:
            out = fn(q, k_comp, v_comp, k_mix, v_mix, mask)
            if out is not None:
                return out
        return mea_attention_absorbed(q, k_comp, v_comp, k_mix, v_mix, mask=mask, causal=mask is None)
    return mea_attention_reference(q, k_comp, v_comp, k_mix, v_mix, mask=mask, causal=mask is None)


try:  # the Triton kernel joins _FAST_DECODE where CUDA is present; without triton the paths above serve
    import torch
    if torch.cuda.is_available():
        from .triton_decode import register as _register_triton_decode
        _register_triton_decode()
except ImportError:
    pass
