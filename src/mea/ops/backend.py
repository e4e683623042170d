"""Which implementation runs an op: the one public switch, resolved here and nowhere else.

A model carries one backend name (``ModelConfig.backend``, or ``Transformer.set_backend``):

- ``"torch"``: the PyTorch forms of ``mea.ops.attention`` everywhere (SDPA picks its own kernel). They
  are the reference every other path is tested against, and the path on CPUs.
- ``"triton"``: MEA's Triton kernels where one exists for the op: the training/prefill fold of the K/V
  mixing into the projection weights (``mea.ops.triton_fold``) and attention over a cache of component
  heads without gradients (``mea.ops.triton_decode``). It needs the ``triton`` package and CUDA tensors;
  on the CPU it runs only under the Triton interpreter (``TRITON_INTERPRET=1``: the tests). Asked for
  where it cannot run, it is an error, never a silent fallback.
- ``"auto"`` (default): ``"triton"`` for the cases the kernels were measured faster on an H200 (the fold
  in fp16/bf16, cached attention of up to ``ABSORB_MAX_QUERIES`` new tokens; docs/performance.md),
  on CUDA tensors with Triton installed; ``"torch"`` for everything else. ``"auto"`` never picks the
  interpreter.

Nothing else decides: no environment variable, no registry filled at import.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")

# Up to this many new tokens, cached MEA attention reads the h' stored heads once (the absorbed form,
# or its Triton kernel); longer chunks (prefill) attend over composite heads, less compute at large Lq.
ABSORB_MAX_QUERIES = 16


def check_backend(name: str) -> str:
    """``name`` if it is a backend, else a ValueError naming the field."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the ``triton`` package imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    from .triton_util import interpreting

    return interpreting()


def _require_triton(op: str, tensors: tuple[Tensor, ...]) -> None:
    if not triton_available():
        raise ValueError(f"backend: 'triton' asked for {op}, but the triton package is not installed "
                         "(pip install triton), use backend 'torch' or 'auto'")
    if not all(t.is_cuda for t in tensors) and not _interpreting():
        dev = next(t.device for t in tensors if not t.is_cuda)
        raise ValueError(f"backend: 'triton' asked for {op} on {dev} tensors; the kernels need CUDA (or "
                         "TRITON_INTERPRET=1 to run them interpreted on the CPU), use backend 'torch' or 'auto'")


def use_triton(backend: str, op: str, *tensors: Tensor, auto_ok: bool = True) -> bool:
    """Whether ``op`` runs its Triton kernel on ``tensors`` under ``backend``.

    ``auto_ok``: whether ``"auto"`` would take the kernel for these inputs (the caller's measured rule,
    e.g. half precision for the fold). ``"triton"`` raises where the kernel cannot run.
    """
    if backend == "torch":
        return False
    if backend == "triton":
        _require_triton(op, tensors)
        return True
    if backend == "auto":
        return auto_ok and triton_available() and all(t.is_cuda for t in tensors)
    check_backend(backend)
    return False


def half_compute(weight: Tensor) -> bool:
    """Whether a product with ``weight`` runs in fp16/bf16 (autocast, or half weights)."""
    dev = weight.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    return dtype in (torch.float16, torch.bfloat16)


def fold_mixes(backend: str, pairs: list[tuple[Tensor, Tensor]], head_dim: int) -> list[Tensor]:
    """Effective projection weights ``W (mix (x) I_d)`` of each (weight, mix) pair (MEA's training fold).

    Triton: one launch for all pairs each way (``mea.ops.triton_fold``); ``"auto"`` takes it for
    fp16/bf16 products only (fp32 data gets exact fp32 products there, far slower than cuBLAS).
    """
    from .attention import fold_mix_into_proj

    ws = [w for w, _ in pairs]
    same = len({(w.dtype, m.dtype) for w, m in pairs}) == 1
    if same and use_triton(backend, "the K/V fold", *ws, auto_ok=half_compute(ws[0])):
        from .triton_fold import fold_mixes_triton

        return list(fold_mixes_triton(pairs, head_dim))
    return [fold_mix_into_proj(w, m, head_dim) for w, m in pairs]


def cached_attention_kernel(backend: str, q: Tensor, *tensors: Tensor, spans: bool) -> bool:
    """Whether cached MEA attention of ``q`` runs the Triton decode kernel.

    ``spans``: the caller knows each row's keys as one span [start, end) (a mask with holes is not one);
    without spans, or for longer chunks than ``ABSORB_MAX_QUERIES``, or with gradients, the kernel cannot
    serve. ``"triton"`` then raises for gradients and holes (the kernel computes neither), and leaves
    long chunks to the PyTorch form (the kernel is a decode kernel: prefill is not its op).
    """
    if backend == "torch" or q.shape[2] > ABSORB_MAX_QUERIES:
        return False
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, *tensors))
    if backend == "triton":
        if grads:
            raise ValueError("backend: 'triton' cached attention has no backward; run it under torch.no_grad() "
                             "or use backend 'torch'")
        if not spans:
            raise ValueError("backend: 'triton' cached attention needs each row's keys as one span; this mask has "
                             "holes (e.g. right-padded prompts in a Hugging Face batch), use backend 'torch' or 'auto'")
    return use_triton(backend, "cached attention", q, *tensors, auto_ok=not grads and spans)


def resolve(backend: Optional[str]) -> str:
    """A backend name, checked; None means ``"auto"``."""
    return check_backend("auto" if backend is None else backend)
