"""MEA attention of new tokens over a KV cache of component heads, by the backend the model names.

Short chunks (decoding: up to ``ABSORB_MAX_QUERIES`` new tokens) read the h' stored heads once: the
Triton kernel (``mea.ops.triton_decode``) where ``mea.ops.backend`` says so, else the absorbed PyTorch
form. Longer chunks materialize the composite heads, which costs less compute at large Lq.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .attention import mea_attention_absorbed, mea_attention_reference
from .backend import ABSORB_MAX_QUERIES, cached_attention_kernel


def mea_attention_cached(q: Tensor, k_comp: Tensor, v_comp: Tensor, k_mix: Tensor, v_mix: Tensor,
                         mask: Optional[Tensor] = None, spans: Optional[tuple[Tensor, Tensor]] = None,
                         backend: str = "auto") -> Tensor:
    """Attention of queries (B, h, Lq, d) over cached component heads (B, h', T, d).

    ``mask``: bool, broadcastable to (B, h, Lq, T), True = attend; None = causal with the queries aligned
    to the last keys. ``spans``: (starts, ends) int (B,) describing ``mask`` exactly (query t of row b
    sees keys ``[starts[b], ends[b] - Lq + t]``), the form the kernel reads; None where the mask is not of
    that form (holes), in which case only the PyTorch forms can serve.
    """
    if cached_attention_kernel(backend, q, k_comp, v_comp, k_mix, v_mix, spans=mask is None or spans is not None):
        from .triton_decode import mea_decode_triton

        starts, ends = spans if spans is not None else (None, None)
        return mea_decode_triton(q, k_comp, v_comp, k_mix, v_mix, ends, cache_starts=starts)
    if q.shape[2] <= ABSORB_MAX_QUERIES:
        return mea_attention_absorbed(q, k_comp, v_comp, k_mix, v_mix, mask=mask, causal=mask is None)
    return mea_attention_reference(q, k_comp, v_comp, k_mix, v_mix, mask=mask, causal=mask is None)
