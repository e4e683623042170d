"""generate(cuda_graph=...): one decoding step captured in a CUDA graph gives the eager tokens.

On CPU: the option is checked, and the fixed-shape step a graph captures (``decode_step``, over a
bucket of the cache buffer) is compared with the eager step. On GPU: greedy tokens with and without
graphs, per attention variant, with left padding.
"""
import warnings

import pytest
import torch

from mea import KVCache, ModelConfig, Transformer
from mea.models import generation as generation_mod

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 97

VARIANTS = {
    "mea": dict(attention="mea", n_heads=6, n_kv_heads=4),  # h' < h and not dividing h
    "mea-mixed": dict(attention="mea", n_heads=6, n_kv_heads=4, layer_kv_heads=[4, 6]),
    "mha": dict(attention="mha", n_heads=6),
    "gqa": dict(attention="gqa", n_heads=6, n_kv_heads=2),
    "diff": dict(attention="diff", n_heads=6),
    "talking_heads": dict(attention="talking_heads", n_heads=6),
    "diff_v2": dict(attention="diff_v2", n_heads=6, n_kv_heads=3),
    "gqa-knock": dict(attention="gqa", n_heads=6, n_kv_heads=2, knock="v", knock_form="mlp"),
}


def tiny(name, dtype=torch.float32, device=DEV):
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=96, n_layers=2, max_seq_len=128, **VARIANTS[name])
    model = Transformer(cfg)
    with torch.no_grad():  # move off the init (identity mixing, unit norms) so every part matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(device=device, dtype=dtype).eval()


def left_padded_prompts(device=DEV):
    ids = torch.randint(1, VOCAB, (3, 7), device=device)
    am = torch.ones(3, 7, dtype=torch.bool, device=device)
    am[1, :3] = False
    am[2, :6] = False  # a one-token prompt
    return ids, am


# ---------------------------------------------------------------------------- CPU
def test_cuda_graph_true_needs_cuda():
    if DEV == "cuda":
        pytest.skip("checks the CPU refusal")
    model = tiny("mea", device="cpu")
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="cuda_graph=True.*CUDA"):
        model.generate(ids, max_new_tokens=3, cuda_graph=True)


def test_cuda_graph_option_ignored_on_cpu():
    model = tiny("mea", device="cpu")
    ids, am = left_padded_prompts("cpu")
    want = model.generate(ids, max_new_tokens=6, attention_mask=am)
    for flag in (None, False):
        assert torch.equal(model.generate(ids, max_new_tokens=6, attention_mask=am, cuda_graph=flag), want)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_whole_cache_step_matches_eager_step(name):
    """The step the graph captures (fixed shapes: whole buffer, masked) equals the eager step."""
    model = tiny(name, device="cpu")
    ids, am = left_padded_prompts("cpu")
    order = torch.argsort((~am).to(torch.int8), dim=1, stable=True)
    packed, lengths = ids.gather(1, order), am.sum(-1)
    packed_mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    caches = [KVCache.for_model(model.config, 3, 12) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(packed, attention_mask=packed_mask, cache=c)
        for _ in range(4):
            tok = torch.randint(0, VOCAB, (3,))
            want = model(tok[:, None], cache=caches[0])[:, -1]
            got = model.decode_step(tok[:, None], caches[1], 12)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(caches[0].seqlens, caches[1].seqlens)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_whole_cache_step_has_no_host_sync():
    """No data-dependent Python value in the step (what a CUDA graph cannot capture): Dynamo traces it
    as one graph. (``int(positions.max())``, the eager path's key count, would break it.)"""
    torch._dynamo.reset()
    model = tiny("mea", device="cpu")
    cache = KVCache.for_model(model.config, 2, 10)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 3)), cache=cache)
        step = torch.compile(model.decode_step, fullgraph=True, backend="eager")
        step(torch.randint(0, VOCAB, (2, 1)), cache, 8)
    assert cache.seqlens.tolist() == [4, 4]


# ---------------------------------------------------------------------------- GPU
class _Spy(generation_mod.GraphedDecoder):
    made = []

    def __init__(self, *a):
        super().__init__(*a)
        _Spy.made.append(self)


@pytest.fixture
def spy(monkeypatch):
    _Spy.made = []
    monkeypatch.setattr(generation_mod, "GraphedDecoder", _Spy)
    return _Spy


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpu_graph_tokens_equal_eager(name, spy):
    model = tiny(name)
    ids, am = left_padded_prompts()
    want = model.generate(ids, max_new_tokens=12, attention_mask=am, cuda_graph=False)
    assert not spy.made
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="generate: capturing")  # a failed capture (eager fallback) fails
        got = model.generate(ids, max_new_tokens=12, attention_mask=am)  # default: on for CUDA
    assert len(spy.made) == 1 and len(spy.made[0].graphs) == 1 and spy.made[0].replays == 12 - 2
    assert torch.equal(got, want), (got, want)


@pytest.mark.gpu
def test_gpu_graph_with_eos_and_short_runs(spy):
    model = tiny("mea")
    ids, am = left_padded_prompts()
    eager = model.generate(ids, max_new_tokens=10, attention_mask=am, cuda_graph=False)
    eos = int(eager[0, 7 + 3])  # row 0 stops at its 4th new token; the others run on
    for n in (1, 2, 3, 10):
        want = model.generate(ids, max_new_tokens=n, attention_mask=am, eos_token_id=eos, cuda_graph=False)
        got = model.generate(ids, max_new_tokens=n, attention_mask=am, eos_token_id=eos, cuda_graph=True)
        assert torch.equal(got, want), (n, got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mea", "gqa", "diff"])
def test_gpu_graph_step_logits_bf16(name):
    """bf16: the replayed step's logits against the eager step's, step by step on twin caches (greedy
    tokens could flip on a near tie, so compare logits)."""
    model = tiny(name, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (4, 9), device="cuda")
    caches = [KVCache.for_model(model.config, 4, 40, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    graphed = generation_mod.GraphedDecoder(model, caches[1], bucket=12)
    with torch.no_grad():
        for c in caches:
            model(ids, cache=c)
        for i in range(6):
            tok = torch.randint(0, VOCAB, (4,), device="cuda")
            want = model(tok[:, None], cache=caches[0])[:, -1].float()
            got = graphed(tok, 9 + i + 1).float()
            assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert graphed.replays == 4 and sorted(graphed.graphs) == [12, 24]  # keys 10..15: buckets 12 and 24
    assert torch.equal(caches[0].seqlens, caches[1].seqlens)


@pytest.mark.gpu
def test_gpu_graph_uses_the_triton_kernel(monkeypatch, spy):
    """The MEA decode kernel is what the captured step launches (backend auto, bf16 on CUDA)."""
    pytest.importorskip("triton")
    from mea.ops import triton_decode

    calls = []
    real = triton_decode.mea_decode_triton
    monkeypatch.setattr(triton_decode, "mea_decode_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny("mea", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 5), device="cuda")
    a = model.generate(ids, max_new_tokens=8, cuda_graph=True)
    # The prefill attends over composite heads (FlashAttention); the warm-up step and the capture run
    # the kernel, 2 layers each; replays run no Python.
    assert len(calls) == 2 * 2
    assert spy.made[-1].replays == 6
    assert torch.equal(model.generate(ids, max_new_tokens=8, cuda_graph=True), a)  # replays are deterministic


@pytest.mark.gpu
def test_gpu_graph_buckets_cross(spy, monkeypatch):
    """A run longer than one bucket captures one graph per bucket it crosses, with the eager tokens."""
    model = tiny("mea")
    ids, am = left_padded_prompts()
    want = model.generate(ids, max_new_tokens=40, attention_mask=am, cuda_graph=False)
    monkeypatch.setattr(generation_mod, "GRAPH_BUCKET", 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="generate: capturing")
        got = model.generate(ids, max_new_tokens=40, attention_mask=am)
    assert sorted(spy.made[-1].graphs) == [16, 32, 47]  # the last bucket ends with the cache (7 + 40 slots)
    assert torch.equal(got, want), (got, want)


_FALLBACK_SCRIPT = """
import warnings
import torch
import test_generate_graph as t
from mea import Transformer
from mea.models import generation as gm

model = t.tiny("mea")
ids, am = t.left_padded_prompts()
want = model.generate(ids, max_new_tokens=6, attention_mask=am, cuda_graph=False)
step = Transformer.decode_step

def syncing_step(self, tok, cache, keys):
    if torch.cuda.is_current_stream_capturing():
        tok.sum().item()  # a host sync: capture fails
    return step(self, tok, cache, keys)

Transformer.decode_step = syncing_step
made = []
class Spy(gm.GraphedDecoder):
    def __init__(self, *a):
        super().__init__(*a)
        made.append(self)
gm.GraphedDecoder = Spy
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = model.generate(ids, max_new_tokens=6, attention_mask=am, cuda_graph=True)
assert any("decoding eagerly" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert made[-1].failed and not made[-1].graphs
assert torch.equal(got, want), (got, want)
# The process stays usable: eager work, and a graph captured afterwards.
Transformer.decode_step = step
assert torch.equal(model.generate(ids, max_new_tokens=6, attention_mask=am, cuda_graph=True), want)
assert len(made[-1].graphs) == 1 and made[-1].replays == 4
print("ok")
"""


@pytest.mark.gpu
def test_gpu_failed_capture_falls_back_to_eager():
    """A step that syncs with the host cannot be captured: generate warns and decodes eagerly, with the
    same tokens. In a subprocess, so that a failed capture cannot disturb the other tests."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent)] + sys.path)}
    res = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
