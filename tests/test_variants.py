"""The cross-head family's newer members: Differential Transformer V2 against Microsoft's reference, knocking
heads against its base variants, and what every variant and option counts (parameters, FLOPs, KV bytes)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mea import KVCache, ModelConfig, Transformer
from mea.layers.attention import ATTENTION_CLASSES, AttnInputs, build_attention
from mea.layers.rope import RotaryEmbedding
from mea.ops.attention import fold_knock_into_proj, knock_heads


def tiny(attention="mha", **kw):
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(attention=attention, **base)


def randomize(model, scale=0.3, skip=()):
    """Perturb every parameter (but those whose name contains one of ``skip``), so that identity-initialized
    parts (mixing, norms, knocks) are exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    return model


# ---------------------------------------------------------------------------- Differential Transformer V2
# A plain-PyTorch restatement of the forward of `MultiheadFlashDiffV2` (use_diff_v2=True) in
# microsoft/unilm, Diff-Transformer/Diff-Transformer-V2/multihead_flashdiffv2.py (commit 31646c58ba06),
# written from reading it: its FlashAttention call becomes a materialized causal softmax in which query head
# j reads key/value head j // (2h / h_kv) (flash_attn_func's grouping), and its rotary kernel
# (kernel.rotary.apply_rotary_emb, interleaved=True) the GPT-J rotation of channel pairs (2i, 2i+1).
def rotate_interleaved(x, cos, sin):
    """x (B, L, n, d); cos/sin (L, d/2): pair (2i, 2i+1) turns by angle i."""
    c, s = cos[None, :, None], sin[None, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


def causal_grouped_attention(q, k, v):
    """(B, L, n_q, d) queries over (B, L, n_kv, d) keys/values, causal, softmax scale 1/sqrt(d)."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    L = q.shape[1]
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v)


class ReferenceDiffV2(nn.Module):
    def __init__(self, d_model, num_heads, num_kv_heads, head_dim):
        super().__init__()
        self.h, self.hk, self.d = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, 2 * num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.lambda_proj = nn.Linear(d_model, num_heads, bias=False)

    def forward(self, x, rel_pos):
        B, L, _ = x.shape
        q = rotate_interleaved(self.q_proj(x).view(B, L, 2 * self.h, self.d), *rel_pos)
        k = rotate_interleaved(self.k_proj(x).view(B, L, self.hk, self.d), *rel_pos)
        v = self.v_proj(x).view(B, L, self.hk, self.d)
        o = causal_grouped_attention(q, k, v)  # (B, L, 2h, d)
        weight = torch.sigmoid(self.lambda_proj(x))[..., None]  # (B, L, h, 1)
        o = o[:, :, 0::2] - weight * o[:, :, 1::2]
        return self.o_proj(o.reshape(B, L, self.h * self.d))


def reference_rel_pos(L, head_dim, theta, dtype):
    """The (cos, sin) tables (L, d/2) of the reference's rotary kernel, with our frequencies (computed in fp32,
    as our RotaryEmbedding computes them)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def interleaved_to_half(weight, head_dim):
    """q/k projection rows of the interleaved rotary layout in ours (rotate-half): our channel i is their 2i,
    our channel d/2 + i their 2i + 1, in every head. Scores are unchanged: q and k are permuted alike."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.view(-1, head_dim, weight.shape[-1])[:, perm].reshape(weight.shape)


def load_reference_into(layer, ref):
    d = layer.head_dim
    with torch.no_grad():
        layer.q_proj.weight.copy_(interleaved_to_half(ref.q_proj.weight, d))
        layer.k_proj.weight.copy_(interleaved_to_half(ref.k_proj.weight, d))
        for name in ("v_proj", "o_proj", "lambda_proj"):
            getattr(layer, name).weight.copy_(getattr(ref, name).weight)


def random_reference(cfg, layer_idx=0):
    torch.manual_seed(100 + layer_idx)
    ref = ReferenceDiffV2(cfg.d_model, cfg.n_heads, cfg.kv_heads_at(layer_idx), cfg.head_dim).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)  # lambda_proj too: sigmoid(lambda) spread over (0, 1)
    return ref


@pytest.mark.parametrize("hk", [4, 2, 1])
def test_diff_v2_layer_equals_microsoft_reference(hk):
    cfg = tiny("diff_v2", n_kv_heads=hk, n_layers=1)
    ref = random_reference(cfg)
    layer = build_attention(cfg, 0).double()
    load_reference_into(layer, ref)
    assert {n for n, _ in layer.named_parameters()} == {n for n, _ in ref.named_parameters()}
    L = 11
    x = torch.randn(3, L, cfg.d_model, dtype=torch.float64)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(L)[None].expand(3, L), torch.float64)
    want = ref(x, reference_rel_pos(L, cfg.head_dim, cfg.rope_theta, torch.float64))
    torch.testing.assert_close(layer(x, AttnInputs(cos=cos, sin=sin)), want, rtol=1e-10, atol=1e-10)


class ReferenceLayer(nn.Module):
    """A decoder layer's attention served by the reference module (positions 0..L-1, no cache)."""

    def __init__(self, ref, cfg):
        super().__init__()
        self.ref, self.cfg = ref, cfg

    def forward(self, x, a):
        assert a.cache is None and a.mask is None
        return self.ref(x, reference_rel_pos(x.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.dtype))


@pytest.mark.parametrize("hk", [4, 2])
def test_diff_v2_model_logits_cached_decoding_and_generate_equal_microsoft_reference(hk):
    """A whole model of diff_v2 layers against the same model whose attention is the reference module: logits,
    logits decoded chunk by chunk over a KV cache (which holds h' heads), and greedy generate()."""
    cfg = tiny("diff_v2", n_kv_heads=hk, n_layers=2)
    ours = randomize(Transformer(cfg)).double().eval()
    theirs = randomize(Transformer(cfg)).double().eval()
    theirs.load_state_dict(ours.state_dict())
    for i, (mine, other) in enumerate(zip(ours.model.layers, theirs.model.layers)):
        ref = random_reference(cfg, i)
        load_reference_into(mine.self_attn, ref)
        other.self_attn = ReferenceLayer(ref, cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        want = theirs(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-9, atol=1e-9)
        cache = KVCache.for_model(cfg, 2, 32, dtype=torch.float64)
        got = torch.cat([ours(c, cache=cache) for c in (x[:, :5], x[:, 5:6], x[:, 6:10], x[:, 10:11], x[:, 11:])], 1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert [k.shape[1] for k in cache.k] == [hk, hk]
        seq = x[:1, :4]
        for _ in range(6):
            seq = torch.cat([seq, theirs(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert ours.generate(x[:1, :4], max_new_tokens=6).tolist() == seq.tolist()


def test_diff_v2_subtracts_within_a_pair_that_shares_keys_and_values():
    """Output head i is o_{2i} - sigmoid(lambda_i) o_{2i+1}: with the odd query heads' projections zeroed,
    lambda_proj has no effect, and the layer is GQA over the even query heads."""
    cfg = tiny("diff_v2", n_kv_heads=2, n_layers=1)
    layer = randomize(build_attention(cfg, 0))
    gqa = build_attention(tiny("gqa", n_kv_heads=2, n_layers=1), 0)
    d, h = cfg.head_dim, cfg.n_heads
    with torch.no_grad():
        layer.q_proj.weight.view(h, 2, d, -1)[:, 1] = 0  # odd heads: uniform attention, subtracted in full
        layer.v_proj.weight.zero_()
        layer.v_proj.weight.view(2, d, -1)[:, 0, 0] = 1.0  # value channel 0 = x_0 in every head
    x = torch.randn(2, 7, cfg.d_model)
    cos, sin = RotaryEmbedding(d)(torch.arange(7)[None].expand(2, 7), torch.float32)
    a = AttnInputs(cos=cos, sin=sin)
    out = layer(x, a)
    # the uniform causal average of x_0 over the prefix, weighted by sigmoid(lambda), comes off each even head
    with torch.no_grad():
        even = layer.q_proj.weight.view(h, 2, d, -1)[:, 0].reshape(h * d, -1)
        gqa.q_proj.weight.copy_(even)
        for name in ("k_proj", "v_proj", "o_proj"):
            getattr(gqa, name).weight.copy_(getattr(layer, name).weight)
        prefix_mean = torch.cumsum(x[..., 0], 1) / torch.arange(1, 8)
        lam = torch.sigmoid(layer.lambda_proj(x))  # (B, L, h)
        heads = torch.zeros(2, 7, h, d)
        heads[..., 0] = lam * prefix_mean[..., None]
        want = gqa(x, a) - layer.o_proj(heads.flatten(2))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- knocking heads
BASES = [("mha", {}), ("gqa", {"n_kv_heads": 2}), ("mea", {"n_kv_heads": 4}), ("mea", {"n_kv_heads": 3}),
         ("diff_v2", {"n_kv_heads": 2}), ("diff", {}), ("talking_heads", {})]
KNOCKS = [("v", "linear"), ("qkv", "linear"), ("v", "mlp"), ("qkv", "mlp")]


@pytest.mark.parametrize("knock,form", KNOCKS)
@pytest.mark.parametrize("attention,kw", BASES)
def test_knocking_heads_at_initialization_is_its_base_variant_bit_for_bit(attention, kw, knock, form):
    """A fresh knock is the identity (linear: T = I; MLP: up = down = I, gate = 0, 2 sigmoid(0) = 1): with the
    base's weights the model computes the base's logits, cached logits and gradients, bit for bit. (MEA with
    an MLP knock mixes its values token by token where the base folds the mix into the weight: the same sums
    in another order, so there float64 agreement to rounding.)"""
    torch.manual_seed(0)
    base = randomize(Transformer(tiny(attention, **kw))).double().eval()
    knocked = Transformer(tiny(attention, knock=knock, knock_form=form, **kw)).double().eval()
    missing, unexpected = knocked.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".knock_" in n for n in missing)

    def same(a_, b_, what):
        if attention == "mea" and form == "mlp":
            torch.testing.assert_close(a_, b_, rtol=1e-12, atol=1e-14, msg=what)
        else:
            assert torch.equal(a_, b_), what

    x = torch.randint(0, 97, (2, 10))
    same(knocked(x), base(x), "logits")
    for model in (base, knocked):
        F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    grads = dict(knocked.named_parameters())
    for name, p in base.named_parameters():
        same(grads[name].grad, p.grad, name)
    with torch.no_grad():
        outs = []
        for model in (base, knocked):
            cache = KVCache.for_model(model.config, 2, 16, dtype=torch.float64)
            outs.append(torch.cat([model(c, cache=cache) for c in (x[:, :6], x[:, 6:7], x[:, 7:])], 1))
        assert torch.equal(outs[0], outs[1])


def _no_op_hook(module, args, out):
    return out


@pytest.mark.parametrize("attention,kw", [("mha", {}), ("gqa", {"n_kv_heads": 2}), ("mea", {"n_kv_heads": 3}),
                                          ("diff_v2", {"n_kv_heads": 2})])
def test_knock_folded_into_the_weights_equals_knocking_every_token(attention, kw):
    """The training path folds a linear knock into the projection weights (W_i T) and, for MEA, the mixing
    too; a forward hook on the projections (as an adapter would) sends the layer through the token-by-token
    form instead. Same outputs and gradients, in float64, with trained-looking (random) knocks."""
    torch.manual_seed(1)
    folded = randomize(Transformer(tiny(attention, knock="qkv", **kw))).double()
    unfolded = Transformer(tiny(attention, knock="qkv", **kw)).double()
    unfolded.load_state_dict(folded.state_dict())
    for layer in unfolded.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).register_forward_hook(_no_op_hook)
    x = torch.randint(0, 97, (2, 12))
    outs = []
    for model in (folded, unfolded):
        out = model(x)
        F.cross_entropy(out.flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    grads = dict(unfolded.named_parameters())
    for name, p in folded.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fold_knock_into_proj_equals_knocking_the_heads_forward_and_grads():
    torch.manual_seed(2)
    n, d, D = 3, 8, 20
    w = torch.randn(n * d, D, dtype=torch.float64, requires_grad=True)
    t = torch.randn(d, d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    g = torch.randn(2, 5, n * d, dtype=torch.float64)
    folded = x @ fold_knock_into_proj(w, t, d).T
    heads = knock_heads((x @ w.T).view(2, 5, n, d), (t,)).flatten(2)
    torch.testing.assert_close(folded, heads)
    for a_, b_ in zip(torch.autograd.grad(folded, (w, t), g), torch.autograd.grad(heads, (w, t), g)):
        torch.testing.assert_close(a_, b_)
    # the MLP form, as the paper writes it: 2 (V W_up * sigmoid(V W_gate)) W_down
    up, gate, down = (torch.randn(d, d, dtype=torch.float64) for _ in range(3))
    v = torch.randn(4, n, d, dtype=torch.float64)
    torch.testing.assert_close(knock_heads(v, (up, gate, down)), 2 * ((v @ up) * torch.sigmoid(v @ gate)) @ down)


@pytest.mark.parametrize("kw,msg", [(dict(knock="x"), "knock"), (dict(knock="vv"), "knock"), (dict(knock=""), "knock"),
                                    (dict(knock="v", knock_form="gated"), "knock_form")])
def test_bad_knock_options_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=rf"^{msg}:"):
        tiny("mha", **kw)


def test_knock_letters_are_kept_in_one_order_and_round_trip():
    cfg = tiny("mea", n_kv_heads=2, knock="vkq", knock_form="mlp")
    assert cfg.knock == "qkv"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_preset("tiny", attention="gqa", n_kv_heads=2, knock="v").knock == "v"


# ---------------------------------------------------------------------------- what every variant counts
OPTIONS = [dict(attention=a, **kw) for a, kw in BASES] + [
    dict(attention=a, knock=k, knock_form=f, **kw) for a, kw in BASES for k, f in KNOCKS] + [
    dict(attention="mea", n_kv_heads=4, layer_kv_heads=[4, 1], knock="kv", knock_form="mlp"),
    dict(attention="diff_v2", n_kv_heads=4, layer_kv_heads=[2, 1], head_norm=True),
    dict(attention="gqa", n_kv_heads=1, knock="qk")]


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_params_and_kv_bytes_from_the_config_equal_a_built_model(kw):
    cfg = tiny(**kw)
    model = Transformer(cfg).eval()
    assert cfg.num_params() == model.num_params()
    assert cfg.num_params(non_embedding=True) == model.num_params(non_embedding=True)
    B, T = 2, 7
    cache = KVCache.for_model(cfg, B, T)
    with torch.no_grad():
        model(torch.randint(0, 97, (B, T)), cache=cache)
    assert cache.nbytes() == cfg.kv_cache_bytes_per_token * B * T * 2  # fp32 here, the config counts 2 bytes
    assert [k.shape[1] for k in cache.k] == [cfg.kv_heads_at(i) for i in range(cfg.n_layers)]


def _projection_flops_per_token(cfg, L=16):
    """Matrix-product FLOPs per token of one layer's forward, as FlopCounterMode counts them (attention itself
    runs in SDPA, which the counter does not see on a CPU)."""
    layer = build_attention(cfg, 0)
    x = torch.randn(1, L, cfg.d_model)
    cos, sin = RotaryEmbedding(cfg.head_dim)(torch.arange(L)[None], torch.float32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x, AttnInputs(cos=cos, sin=sin))
    return counter.get_total_flops() / L


@pytest.mark.parametrize("kw", [dict(attention="mha"), dict(attention="gqa", n_kv_heads=2),
                                dict(attention="diff_v2"), dict(attention="diff_v2", n_kv_heads=1),
                                dict(attention="gqa", n_kv_heads=2, knock="qkv", knock_form="mlp"),
                                dict(attention="diff_v2", n_kv_heads=2, knock="v", knock_form="mlp")])
def test_flops_per_token_counts_what_a_layer_computes(kw):
    """What flops_per_token charges a layer for its weights (2 per parameter, plus extra_flops) is what a
    forward computes: diff_v2's doubled queries and lambda_proj, the MLP knock on every head."""
    cfg = tiny(n_layers=1, **kw)
    cls = ATTENTION_CLASSES[cfg.attention]
    weights = 2 * cfg.attention_params() - 2 * cfg.n_heads * cfg.head_dim * bool(cfg.head_norm)
    assert _projection_flops_per_token(cfg) == weights + cls.extra_flops(cfg, cfg.n_kv_heads)
    T = 32
    mlp_and_head = 6 * (cfg.num_params(non_embedding=True) - cfg.attention_params() + cfg.vocab_size * cfg.d_model)
    assert cfg.flops_per_token(T) == mlp_and_head + 3 * (weights + cls.extra_flops(cfg, cfg.n_kv_heads)
                                                         + cls.score_flops(cfg, T))


def test_diff_v2_scores_twice_and_linear_knock_costs_its_fold():
    cfg = tiny("diff_v2", n_kv_heads=2)
    assert ATTENTION_CLASSES["diff_v2"].score_flops(cfg, 100) == 2 * ATTENTION_CLASSES["mha"].score_flops(cfg, 100)
    # the folded linear knock: the base layer's per-token work plus one weight-sized product per step
    base, knocked = tiny("mha", n_layers=1), tiny("mha", n_layers=1, knock="qkv")
    L, d, D, h = 64, base.head_dim, base.d_model, base.n_heads
    fold = 3 * 2 * d * d * h * d * D / d  # (d x d) times (d, h d D / d) for each of q, k, v
    assert _projection_flops_per_token(knocked, L) == _projection_flops_per_token(base, L) + fold / L


def test_mea_with_a_linear_knock_keeps_the_triton_fold(monkeypatch):
    """MEA folds a linear knock into its projection weights first (in the weights' dtype), then hands both
    weights to the K/V fold together: the Triton backend (interpreted here) still makes one launch for K and
    V, and gives the outputs and gradients of the PyTorch backend (fp32)."""
    pytest.importorskip("triton")
    from mea.ops import triton_fold

    calls = []
    real = triton_fold.fold_mixes_triton
    monkeypatch.setattr(triton_fold, "fold_mixes_triton", lambda pairs, *a, **k: calls.append(len(pairs)) or
                        real(pairs, *a, **k))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA, conftest has Triton interpret
    torch.manual_seed(3)
    cfg = tiny("mea", n_kv_heads=3, knock="v", n_layers=1)
    layer = randomize(build_attention(cfg, 0)).to(dev)
    x, dy = torch.randn(2, 12, cfg.d_model, device=dev), torch.randn(2, 12, cfg.d_model, device=dev)
    cos, sin = RotaryEmbedding(cfg.head_dim).to(dev)(torch.arange(12, device=dev)[None].expand(2, 12), torch.float32)
    runs = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        y = layer(x, AttnInputs(cos=cos, sin=sin))
        y.backward(dy)
        runs.append((y, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    assert calls == [2]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)
    for name, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
