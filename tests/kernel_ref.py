"""What the Triton kernels' tests share: the device they run on (CUDA, else the CPU interpreter) and how
an output is compared with its float64 reference."""
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error ||out - ref|| / ||ref|| against a float64 reference, for kernels computing in fp32 and
# rounding their output once to the input dtype.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
