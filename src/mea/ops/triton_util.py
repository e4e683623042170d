"""What the Triton kernels of ``mea.ops`` share: the integer math and multiprocessor count their launch
grids are sized by, whether Triton runs interpreted on the CPU (``TRITON_INTERPRET=1``: the tests), and
the input checks of their entry points."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    # Plain integer math: triton.cdiv/next_power_of_2 go through Triton's constexpr-function wrapper,
    # several microseconds per call on the host, and a decode step is host-bound at small sizes.
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 4 for the interpreter on the CPU (a grid of a few programs)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_inputs(op: str, fallback: str, **tensors: Tensor) -> None:
    """Raise ValueError naming ``op`` unless the tensors are fp16/bf16/fp32 on one device that the
    kernel runs on (CUDA, or the CPU under the interpreter); ``fallback`` names the PyTorch form."""
    bad = {k: t.dtype for k, t in tensors.items() if t.dtype not in KERNEL_DTYPES}
    if bad:
        raise ValueError(f"{op}: {' and '.join(tensors)} must be fp16, bf16 or fp32, got "
                         + ", ".join(str(d) for d in bad.values()))
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"{op}: " + " and ".join(f"{k} on {t.device}" for k, t in tensors.items()))
    dev = devices.pop()
    if not (dev.type == "cuda" or interpreting()):
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (got {dev}); use {fallback}, or set "
                         "TRITON_INTERPRET=1 to run it interpreted")
