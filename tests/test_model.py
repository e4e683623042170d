"""Core library: exact equivalences between variants, fast path vs reference, caching, padding, configs."""
import math

import pytest
import torch
import torch.nn.functional as F

from mea import KVCache, ModelConfig, Transformer
from mea.layers.attention import AttnInputs, DiffAttention, mixing_init
from mea.ops.attention import (attention_naive, fold_mix_into_proj, mea_attention_absorbed,
                               mea_attention_reference, mix_heads, sdpa)

VARIANTS = [("mha", {}), ("gqa", {"n_kv_heads": 2}), ("gqa", {"n_kv_heads": 1}), ("diff", {}),
            ("talking_heads", {}), ("mea", {"n_kv_heads": 4}), ("mea", {"n_kv_heads": 2}),
            ("mea", {"n_kv_heads": 3}), ("diff_v2", {}), ("diff_v2", {"n_kv_heads": 2}),
            ("mha", {"knock": "v"}), ("gqa", {"n_kv_heads": 2, "knock": "qkv", "knock_form": "mlp"}),
            ("mea", {"n_kv_heads": 3, "knock": "qkv"}), ("mea", {"n_kv_heads": 3, "knock": "v", "knock_form": "mlp"})]


def tiny(attention="mha", **kw):
    base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(attention=attention, **base)


def randomize(model, scale=0.3):
    """Perturb every parameter so that identity-initialized parts (mixing, norms) are exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    return model


def copy_shared(dst, src):
    """Copy every parameter whose name exists in both models."""
    sd = src.state_dict()
    missing = dst.load_state_dict({k: v for k, v in sd.items() if k in dst.state_dict()}, strict=False)
    return missing


# ---------------------------------------------------------------------------- exact equivalences
def test_mea_identity_no_norm_is_mha():
    torch.manual_seed(1)
    mha = Transformer(tiny("mha"))
    mea = Transformer(tiny("mea", n_kv_heads=4, head_norm=False))
    randomize(mha)
    missing = copy_shared(mea, mha)
    assert sorted(missing.missing_keys) == sorted(k for k in mea.state_dict() if k.endswith(("k_mix", "v_mix")))
    for layer in mea.model.layers:
        assert torch.equal(layer.self_attn.k_mix, torch.eye(4))
    x = torch.randint(0, 97, (2, 17))
    torch.testing.assert_close(mea(x), mha(x), rtol=1e-5, atol=1e-5)


def test_mea_replication_is_gqa():
    torch.manual_seed(2)
    gqa = Transformer(tiny("gqa", n_kv_heads=2, head_norm=True))
    mea = Transformer(tiny("mea", n_kv_heads=2, head_norm=True))
    randomize(gqa)
    copy_shared(mea, gqa)
    w = mea.model.layers[0].self_attn.k_mix
    torch.testing.assert_close(w, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    x = torch.randint(0, 97, (2, 19))
    torch.testing.assert_close(mea(x), gqa(x), rtol=1e-5, atol=1e-5)


def test_mea_replication_for_nondivisor_matches_explicit_grouping():
    # h' = 3, h = 4: query head i reads component floor(3 i / 4) -> [0, 0, 1, 2]
    w = mixing_init(3, 4)
    assert w.argmax(0).tolist() == [0, 0, 1, 2]
    assert torch.equal(w.sum(0), torch.ones(4))


def test_talking_heads_identity_is_mha():
    torch.manual_seed(3)
    mha = Transformer(tiny("mha"))
    tha = Transformer(tiny("talking_heads"))
    randomize(mha)
    copy_shared(tha, mha)
    x = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(tha(x), mha(x), rtol=1e-5, atol=1e-5)
    # and a non-identity mix really changes the output
    with torch.no_grad():
        tha.model.layers[0].self_attn.pre_mix.add_(0.5)
    assert not torch.allclose(tha(x), mha(x), atol=1e-3)


def test_diff_without_norm_is_mha_with_rederived_output_projection():
    """Differential attention without the head norm is standard attention: 2h softmax heads of
    width d/2 over shared values, with an output projection that carries (1, -lambda)."""
    torch.manual_seed(4)
    cfg = tiny("diff", head_norm=False)
    model = Transformer(cfg)
    randomize(model)
    layer: DiffAttention = model.model.layers[1].self_attn
    B, L, D, h, d = 2, 11, cfg.d_model, cfg.n_heads, cfg.head_dim
    x = torch.randn(B, L, D)
    pos = torch.arange(L)[None].expand(B, L)
    cos, sin = model.rotary(pos, x.dtype)
    ref = layer(x, AttnInputs(cos=cos, sin=sin))

    # Build plain MHA over 2h heads from the diff weights.
    lam = layer.lambda_full().item()
    scale = 1.0 - layer.lambda_init
    q = layer.q_proj(x).view(B, L, 2 * h, d // 2).transpose(1, 2)  # head 2i+c = half c of head i
    k = layer.k_proj(x).view(B, L, 2 * h, d // 2).transpose(1, 2)
    from mea.layers.rope import apply_rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = layer.v_proj(x).view(B, L, h, d).transpose(1, 2).repeat_interleave(2, dim=1)  # each pair shares V_i
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, 2h, L, d)
    W_O = layer.o_proj.weight.view(D, h, d)
    W_new = torch.stack([W_O * scale, -lam * scale * W_O], dim=2).reshape(D, 2 * h * d)  # re-derived o_proj
    out = o.transpose(1, 2).reshape(B, L, 2 * h * d) @ W_new.t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_head_norm_breaks_the_fold():
    """With the head norm on, MEA (h'=h, identity) is not MHA: the norm is what mixing needs."""
    torch.manual_seed(5)
    mha = Transformer(tiny("mha"))
    mea = Transformer(tiny("mea", n_kv_heads=4, head_norm=True))
    randomize(mha)
    copy_shared(mea, mha)
    x = torch.randint(0, 97, (1, 9))
    assert not torch.allclose(mea(x), mha(x), atol=1e-3)


@pytest.mark.parametrize("attention", ["mha", "mea", "diff"])
def test_norm_gain_folded_into_o_proj_is_the_same_layer(attention):
    """On the full-sequence path the head norm's weight folds into o_proj (W_O diag(g)): same outputs and
    gradients for every parameter (float64) as the norm applied to the tokens, which a hooked o_proj
    forces (a hook may change what o_proj computes, so its weight alone cannot stand for it); a cached
    forward keeps the norm as it is."""
    torch.manual_seed(11)
    model = Transformer(tiny(attention, n_kv_heads=2 if attention == "mea" else None, head_norm=True)).double()
    randomize(model)
    for layer in model.model.layers:
        layer.self_attn.head_norm.weight.data.uniform_(0.2, 1.5)
    x = torch.randint(0, 97, (2, 11))
    runs = []
    for folded in (False, True):
        hooks = [] if folded else [l.self_attn.o_proj.register_forward_hook(lambda m, i, o: None)
                                   for l in model.model.layers]
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        for hk in hooks:
            hk.remove()
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    for n, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], g, rtol=1e-9, atol=1e-12, msg=n)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # the cached path (decode) and a hooked o_proj call the norm itself
        calls = []
        handle = attn.head_norm.register_forward_hook(lambda m, i, o: calls.append(1))
        cache = KVCache.for_model(model.config, 2, 16, dtype=torch.float64)
        model(x, cache=cache)
        assert calls
        calls.clear()
        seen = attn.o_proj.register_forward_hook(lambda m, i, o: None)
        model(x)
        assert calls
        seen.remove()
        calls.clear()
        model(x)
        assert not calls
        handle.remove()


def test_diff_lambda_init_schedule():
    m = Transformer(tiny("diff", n_layers=3))
    inits = [l.self_attn.lambda_init for l in m.model.layers]
    assert inits == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * i) for i in range(3)])


# ---------------------------------------------------------------------------- fast path vs reference
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("hk", [4, 3, 1])
def test_folded_mea_equals_naive_einsum_forward_and_grads(dtype, tol, hk):
    torch.manual_seed(6)
    B, L, D, h, d = 2, 12, 32, 4, 8
    x = torch.randn(B, L, D, dtype=dtype, requires_grad=True)
    Wk = (torch.randn(hk * d, D) / math.sqrt(D)).to(dtype).requires_grad_()
    Wv = (torch.randn(hk * d, D) / math.sqrt(D)).to(dtype).requires_grad_()
    q = torch.randn(B, h, L, d, dtype=dtype, requires_grad=True)
    km = torch.randn(hk, h, dtype=dtype, requires_grad=True)
    vm = torch.randn(hk, h, dtype=dtype, requires_grad=True)

    def folded():
        k = F.linear(x, fold_mix_into_proj(Wk, km, d)).view(B, L, h, d).transpose(1, 2)
        v = F.linear(x, fold_mix_into_proj(Wv, vm, d)).view(B, L, h, d).transpose(1, 2)
        return sdpa(q, k, v, causal=True)

    def naive():
        kc = (x @ Wk.t()).view(B, L, hk, d)
        vc = (x @ Wv.t()).view(B, L, hk, d)
        k = torch.einsum("njd,ji->nid", kc.reshape(B * L, hk, d), km).view(B, L, h, d).transpose(1, 2)
        v = torch.einsum("njd,ji->nid", vc.reshape(B * L, hk, d), vm).view(B, L, h, d).transpose(1, 2)
        return attention_naive(q, k, v, causal=True)

    leaves = [x, Wk, Wv, q, km, vm]
    g = torch.randn(B, h, L, d, dtype=dtype)
    o1 = folded()
    g1 = torch.autograd.grad(o1, leaves, g)
    o2 = naive()
    g2 = torch.autograd.grad(o2, leaves, g)
    torch.testing.assert_close(o1.float(), o2.float(), rtol=tol, atol=tol)
    for a, b in zip(g1, g2):
        scale = b.float().abs().max().clamp(min=1.0)
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("hk", [1, 2, 3, 6])
@pytest.mark.parametrize("lq", [1, 5])
def test_absorbed_decode_equals_materialized(hk, lq):
    torch.manual_seed(7)
    B, h, T, d = 3, 6, 20, 8
    q = torch.randn(B, h, lq, d)
    kc, vc = torch.randn(B, hk, T, d), torch.randn(B, hk, T, d)
    km, vm = torch.randn(hk, h), torch.randn(hk, h)
    lens = torch.tensor([20, 13, 7])
    pos = lens[:, None] - lq + torch.arange(lq)
    mask = (torch.arange(T)[None, None, :] <= pos[:, :, None])[:, None]
    ref = mea_attention_reference(q, kc, vc, km, vm, mask=mask)
    naive = attention_naive(q, mix_heads(kc, km), mix_heads(vc, vm), mask=mask)
    out = mea_attention_absorbed(q, kc, vc, km, vm, mask=mask)
    torch.testing.assert_close(ref, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mix_heads_matches_paper_einsum():
    T, W = torch.randn(5, 3, 8), torch.randn(3, 4)
    ref = torch.einsum("njd,ji->nid", T, W)
    torch.testing.assert_close(mix_heads(T, W, dim=1), ref)


# ---------------------------------------------------------------------------- caching and padding
@pytest.mark.parametrize("attention,kw", VARIANTS)
def test_incremental_decoding_equals_full_forward(attention, kw):
    torch.manual_seed(8)
    model = randomize(Transformer(tiny(attention, **kw))).eval()
    x = torch.randint(0, 97, (2, 14))
    full = model(x)
    cache = KVCache.for_model(model.config, 2, 32)
    chunks = [x[:, :6], x[:, 6:7], x[:, 7:11], x[:, 11:12], x[:, 12:14]]
    outs = [model(c, cache=cache) for c in chunks]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.seqlens.tolist() == [14, 14]


@pytest.mark.parametrize("attention,kw", VARIANTS)
def test_padding_does_not_change_unpadded_rows(attention, kw):
    torch.manual_seed(9)
    model = randomize(Transformer(tiny(attention, **kw))).eval()
    a = torch.randint(1, 97, (1, 10))
    b = torch.randint(1, 97, (1, 6))
    # left padding: real tokens at the end
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, 4:] = a[0], b[0]
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0], mask[1, 4:] = 1, 1
    out = model(ids, attention_mask=mask)
    torch.testing.assert_close(out[0], model(a)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 4:], model(b)[0], rtol=1e-4, atol=1e-4)
    # right padding
    ids_r = torch.zeros(2, 10, dtype=torch.long)
    ids_r[0], ids_r[1, :6] = a[0], b[0]
    out_r = model(ids_r, attention_mask=(ids_r != 0) | (torch.arange(10) < 6))
    torch.testing.assert_close(out_r[1, :6], model(b)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention,kw", VARIANTS)
def test_batched_generate_with_padding_equals_single(attention, kw):
    torch.manual_seed(10)
    model = randomize(Transformer(tiny(attention, **kw))).eval()
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 3))
    ga = model.generate(a, max_new_tokens=6)[0, 7:]
    gb = model.generate(b, max_new_tokens=6)[0, 3:]
    for side in ("left", "right"):
        ids = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros(2, 7, dtype=torch.long)
        ids[0], mask[0] = a[0], 1
        sl = slice(4, 7) if side == "left" else slice(0, 3)
        ids[1, sl], mask[1, sl] = b[0], 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6)[:, 7:]
        assert out[0].tolist() == ga.tolist(), side
        assert out[1].tolist() == gb.tolist(), side


def test_generate_greedy_matches_argmax_of_full_forward():
    torch.manual_seed(11)
    model = randomize(Transformer(tiny("mea", n_kv_heads=2))).eval()
    x = torch.randint(0, 97, (1, 5))
    out = model.generate(x, max_new_tokens=4)
    seq = x
    for _ in range(4):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()


def test_sampling_options_and_eos():
    torch.manual_seed(12)
    model = randomize(Transformer(tiny("mea", n_kv_heads=2))).eval()
    x = torch.randint(0, 97, (3, 4))
    g = torch.Generator().manual_seed(0)
    out1 = model.generate(x, max_new_tokens=8, temperature=0.8, top_k=10, top_p=0.9, generator=g)
    g = torch.Generator().manual_seed(0)
    out2 = model.generate(x, max_new_tokens=8, temperature=0.8, top_k=10, top_p=0.9, generator=g)
    assert torch.equal(out1, out2) and out1.shape == (3, 12)
    # top_k=1 sampling is greedy
    assert torch.equal(model.generate(x, max_new_tokens=5, temperature=1.0, top_k=1),
                       model.generate(x, max_new_tokens=5))
    # eos stops a row and pads it
    greedy = model.generate(x[:1], max_new_tokens=6)[0, 4:]
    # the first position where a token appears for the first time after position 0 (or 0)
    k = next((i for i in range(1, 6) if int(greedy[i]) not in greedy[:i].tolist()), 0)
    eos = int(greedy[k])
    out = model.generate(x[:1], max_new_tokens=6, eos_token_id=eos, pad_token_id=96)[0, 4:]
    assert out[:k + 1].tolist() == greedy[:k + 1].tolist()
    assert out[k + 1:].tolist() == [96] * (5 - k)


def test_kv_cache_bytes_halved_for_mea():
    B, T = 2, 16
    sizes = {}
    for name, cfg in {"mha": tiny("mha", n_heads=8), "mea": tiny("mea", n_heads=8, n_kv_heads=4)}.items():
        model = Transformer(cfg).eval().to(torch.bfloat16)
        cache = KVCache.for_model(cfg, B, T, dtype=torch.bfloat16)
        model(torch.randint(0, 97, (B, T)), cache=cache)
        sizes[name] = cache.nbytes()
        assert sum(t.numel() * t.element_size() for t in cache.k + cache.v) == cache.nbytes(used_only=False)
        assert cache.nbytes() == cfg.kv_cache_bytes_per_token * B * T
        assert all(k.shape[1] == cfg.n_kv_heads for k in cache.k)
    assert sizes["mea"] * 2 == sizes["mha"]


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kw,field", [
    (dict(attention="mea", n_kv_heads=5), "n_kv_heads"),
    (dict(attention="mea", n_kv_heads=0), "n_kv_heads"),
    (dict(d_model=50, n_heads=4), "n_heads"),
    (dict(attention="gqa", n_kv_heads=3), "n_kv_heads"),
    (dict(attention="flash"), "attention"),
    (dict(attention="mha", n_kv_heads=2), "n_kv_heads"),
    (dict(attention="mea", head_norm_init=0.0), "head_norm_init"),
    (dict(d_model=60, n_heads=4), "head_dim"),                    # 15 channels: RoPE rotates pairs
    (dict(d_model=24, n_heads=4, attention="diff"), "head_dim"),  # halves of 3 channels
    (dict(vocab_size="x"), "vocab_size"),                         # named, not a bare int() error
])
def test_bad_configs_name_the_field(kw, field):
    base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4)
    base.update(kw)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ModelConfig(**base)


@pytest.mark.parametrize("attention", ["mea", "diff", "mha"])
def test_head_norm_init_scales_the_normalized_outputs(attention):
    """head_norm_init sets the head norm's weight at initialization: the attention output going into
    o_proj scales with it (0.25 -> RMS 0.25 per head channel instead of 1)."""
    outs = {}
    for init in (1.0, 0.25):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=1, n_heads=4, attention=attention, head_norm=True,
                          head_norm_init=init)
        model = Transformer(cfg)
        attn = model.model.layers[0].self_attn
        assert torch.all(attn.head_norm.weight == init)
        seen = []
        attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        model(torch.randint(0, 97, (2, 9)))
        outs[init] = seen[0]
    torch.testing.assert_close(outs[0.25], outs[1.0] * 0.25)
    assert ModelConfig.from_dict(ModelConfig(head_norm_init=0.5).to_dict()).head_norm_init == 0.5


def test_explicit_head_dim_allows_nondividing_heads():
    cfg = ModelConfig(vocab_size=97, d_model=50, n_heads=4, head_dim=16, n_layers=1)
    x = torch.randint(0, 97, (1, 5))
    assert Transformer(cfg)(x).shape == (1, 5, 97)


def test_preset_param_counts_and_flops():
    for name in ("tiny", "mini", "small", "125m", "350m"):
        for attention, kw in [("mha", {}), ("mea", {"n_kv_heads": 2}), ("diff", {}), ("talking_heads", {}),
                              ("diff_v2", {"n_kv_heads": 2}), ("gqa", {"n_kv_heads": 2, "knock": "v", "knock_form": "mlp"})]:
            cfg = ModelConfig.from_preset(name, attention=attention, **kw)
            if name in ("tiny", "mini"):
                assert Transformer(cfg).num_params() == cfg.num_params()
            assert cfg.flops_per_token() > 6 * cfg.num_params(non_embedding=True)
    c125 = ModelConfig.from_preset("125m")
    assert 120e6 < c125.num_params() < 170e6
    with pytest.raises(ValueError, match="^preset:"):
        ModelConfig.from_preset("7b")
    with pytest.raises(ValueError, match="^bogus:"):
        ModelConfig.from_preset("tiny", bogus=1)


def test_api_from_issue():
    cfg = ModelConfig.from_preset("tiny", attention="mea", n_kv_heads=2, head_norm=True)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    assert model(ids).shape == (2, 8, cfg.vocab_size)
    assert model.generate(ids, max_new_tokens=3).shape == (2, 11)
    names = set(model.state_dict())
    for n in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_mix", "model.layers.0.self_attn.v_mix",
              "model.layers.0.self_attn.head_norm.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight", "lm_head.weight"]:
        assert n in names, n
    assert model.model.layers[0].self_attn.k_mix.shape == (2, 4)


def test_loss_is_cross_entropy_and_backprops_into_mixing():
    model = Transformer(tiny("mea", n_kv_heads=2))
    x = torch.randint(0, 97, (2, 9))
    loss = model.loss(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(97)) < 0.5
    loss.backward()
    assert model.model.layers[0].self_attn.k_mix.grad.abs().sum() > 0


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    """`model.to(bfloat16)` casts buffers too; RoPE's inverse frequencies stay fp32 (Hugging Face's loader
    keeps them so), else positions in the thousands rotate by wrong angles (cos off by up to 0.5 at 4k)."""
    from mea.layers.rope import RotaryEmbedding

    m = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, max_seq_len=64))
    rope = [mod for mod in m.modules() if isinstance(mod, RotaryEmbedding)]
    assert rope
    want = [r.inv_freq.clone() for r in rope]
    m.to(torch.bfloat16)
    for r, w in zip(rope, want):
        assert r.inv_freq.dtype == torch.float32 and torch.equal(r.inv_freq, w)
    pos = torch.arange(4000, 4096)[None]
    cos, _ = rope[0](pos, torch.float32)
    ref, _ = RotaryEmbedding(rope[0].head_dim, rope[0].theta)(pos, torch.float32)
    assert torch.equal(cos, ref)


def test_cached_forward_rejects_a_mask_over_cached_tokens_and_a_cache_of_another_dtype():
    """Both used to fail late or silently: a Hugging Face-style mask (cached + new tokens) grew the cache
    by its whole length, and a fp32 cache under a bf16 model failed inside attention after layer 0 wrote."""
    from mea import KVCache

    m = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    ids = torch.randint(0, 256, (2, 4))
    cache = KVCache.for_model(m.config, 2, 16)
    m(ids, cache=cache)
    with pytest.raises(ValueError, match="covers the new tokens only"):
        m(ids[:, :2], attention_mask=torch.ones(2, 6, dtype=torch.bool), cache=cache)
    assert cache.seqlens.tolist() == [4, 4]
    with pytest.raises(ValueError, match="cache: holds torch.float32"):
        m.to(torch.bfloat16)(ids, cache=KVCache.for_model(m.config, 2, 16))


def test_generate_accepts_a_pad_id_that_is_no_token():
    """Finished rows are padded in the output, but the model goes on reading eos, so pad -1 works."""
    m = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    prompt = torch.randint(0, 256, (2, 3))
    free = m.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 3])  # row 0 emits it as its first new token
    out = m.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1)
    assert out[0, 3] == eos and (out[0, 4:] == -1).all()
    first = next((i for i in range(3, 9) if free[1, i] == eos), 9)
    assert torch.equal(out[1, :first + 1], free[1, :first + 1])


def test_gqa_never_copies_its_keys(monkeypatch):
    """Grouped keys and values are read in place (SDPA's enable_gqa, or the grouped view), in training,
    prefill and decoding: GQA's decode step once copied its whole cache with repeat_interleave."""
    def refuse(*a, **k):
        raise AssertionError("repeat_interleave called: K/V copied")

    model = Transformer(tiny("gqa", n_kv_heads=2)).eval()
    ids = torch.randint(0, 97, (2, 9))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    want = model.generate(ids, attention_mask=am, max_new_tokens=4)
    logits = model(ids)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    assert torch.equal(model.generate(ids, attention_mask=am, max_new_tokens=4), want)
    torch.testing.assert_close(model(ids), logits)


@pytest.mark.gpu
def test_gpu_gqa_layer_compiles_forward_and_backward():
    """torch.compile of a GQA decoder layer, forward and backward under bf16 autocast (Inductor once
    failed on the copied K/V with a SyntaxError in its generated code), against the eager layer."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("small", attention="gqa", n_kv_heads=2, vocab_size=256)).cuda()
    layer = model.model.layers[0]
    x = torch.randn(4, 128, model.config.d_model, device="cuda", requires_grad=True)
    a = model._attn_inputs(torch.zeros(4, 128, dtype=torch.long, device="cuda"), None, None, None, torch.bfloat16)
    outs = []
    for fn in (layer, torch.compile(layer)):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, a)
        y.float().square().mean().backward()
        outs.append((y.float(), x.grad.clone(), layer.self_attn.k_proj.weight.grad.clone()))
    for got, want in zip(outs[1], outs[0]):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
