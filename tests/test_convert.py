"""KV-cache compression (`mea convert`): the fits, the converted model, the command's errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mea import KVCache, ModelConfig, Transformer
from mea.convert.calibration import input_covariances
from mea.convert.convert import compress_model, convert, parse_layers
from mea.convert.heads import effective_head_weights, fit_components, relative_error


def tiny(attention="gqa", n_heads=6, n_kv_heads=3, n_layers=3, d_model=48, vocab_size=97, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, attention=attention, head_norm=False, **kw)
    return Transformer(cfg).eval()


def rebuilt(mix, w_comp):
    return torch.einsum("ji,jcD->icD", mix, w_comp)


def anisotropic_inputs(n: int, D: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, D, dtype=torch.float64)
    return torch.randn(n, D, generator=g, dtype=torch.float64) * scales


# ------------------------------------------------------------------------------------ the fits
@pytest.mark.parametrize("h,hk", [(8, 4), (9, 2), (6, 1), (5, 5)])
def test_svd_is_best_rank_approximation(h, hk):
    """Eckart-Young: the SVD init's per-head weights are the best rank-h' fit of the stacked heads."""
    d, D = 4, 10
    w = torch.randn(h, d, D, dtype=torch.float64)
    w_comp, mix = fit_components(w, hk, "svd")
    assert w_comp.shape == (hk, d, D) and mix.shape == (hk, h)
    m = w.reshape(h, -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    best = (u[:, :hk] * s[:hk]) @ vh[:hk]
    fit = rebuilt(mix, w_comp).reshape(h, -1)
    torch.testing.assert_close(fit, best, atol=1e-10, rtol=1e-10)
    assert torch.linalg.norm(m - fit) == pytest.approx(float(s[hk:].pow(2).sum().sqrt()), abs=1e-10)
    # Orthogonal mix rows of GQA's row norm sqrt(h / h').
    torch.testing.assert_close(mix @ mix.T, (h / hk) * torch.eye(hk, dtype=torch.float64))
    # No other rank-h' factorization does better (a few random ones, and mean-pooling).
    for _ in range(3):
        other = torch.randn(hk, h, dtype=torch.float64)
        ls = torch.linalg.lstsq(other.T, m).solution
        assert torch.linalg.norm(m - other.T @ ls) >= torch.linalg.norm(m - fit) - 1e-12
    mc, mm = fit_components(w, hk, "mean-pool")
    assert torch.linalg.norm(m - rebuilt(mm, mc).reshape(h, -1)) >= torch.linalg.norm(m - fit) - 1e-12


def test_activation_init_is_whitened_svd():
    """The activation fit equals the truncated SVD of M (I (x) C^1/2), and beats the plain SVD on
    the calibration inputs' keys when those inputs are anisotropic."""
    h, hk, d, D = 6, 2, 4, 12
    w = torch.randn(h, d, D, dtype=torch.float64)
    x = anisotropic_inputs(500, D)
    cov = x.T @ x
    w_comp, mix = fit_components(w, hk, "activation", cov)
    # Explicit whitening: SVD of W_i C^{1/2}, best rank-h' fit there.
    evals, evecs = torch.linalg.eigh(cov)
    c_half = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    mw = torch.einsum("icD,DE->icE", w, c_half).reshape(h, -1)
    s = torch.linalg.svdvals(mw)
    want = float(s[hk:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    # The error measured on actual keys of the inputs, k_i(n) = W_i x_n.
    keys = torch.einsum("icD,nD->nic", w, x)
    keys_hat = torch.einsum("icD,nD->nic", rebuilt(mix, w_comp), x)
    got = float(torch.linalg.norm(keys - keys_hat) / torch.linalg.norm(keys))
    assert got == pytest.approx(want, rel=1e-8)
    assert relative_error(w, rebuilt(mix, w_comp), cov) == pytest.approx(want, rel=1e-8)
    sc, sm = fit_components(w, hk, "svd")
    assert relative_error(w, rebuilt(sm, sc), cov) > got
    with pytest.raises(ValueError, match="cov"):
        fit_components(w, hk, "activation")


@pytest.mark.parametrize("h,hk,sizes", [(9, 3, [3, 3, 3]), (9, 2, [5, 4]), (5, 3, [2, 2, 1]), (4, 1, [4])])
def test_mean_pool_groups(h, hk, sizes):
    d, D = 3, 5
    w = torch.randn(h, d, D, dtype=torch.float64)
    w_comp, mix = fit_components(w, hk, "mean-pool")
    assert mix.sum(1).tolist() == sizes
    assert (mix.sum(0) == 1).all() and set(mix.unique().tolist()) <= {0.0, 1.0}
    for j in range(hk):
        members = mix[j].nonzero().flatten()
        # Groups are contiguous runs of query heads, as GQA's.
        assert (members.diff() == 1).all()
        torch.testing.assert_close(w_comp[j], w[members].mean(0))


def test_weak_heads_of_a_rank_one_fit_of_orthogonal_heads(tmp_path, capsys):
    """Three orthogonal KV heads of different norms fitted by one component: svd keeps the largest
    and leaves the other groups' query heads with mixing near 0 ('weak', reported and warned about);
    mean-pool keeps every head."""
    from mea.convert.convert import weak_heads

    model = tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=1, d_model=48)
    d = model.config.head_dim
    with torch.no_grad():
        for w in (model.model.layers[0].self_attn.k_proj.weight, model.model.layers[0].self_attn.v_proj.weight):
            q, _ = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64))
            basis = q[:, : 3 * d].T.reshape(3, d, 48)  # orthonormal rows: the three heads are orthogonal
            w.copy_((basis * torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)[:, None, None]).reshape(3 * d, 48))
    _, rows = compress_model(model, 1, "svd", "all")
    assert rows[0]["weak_heads"] == [2, 3, 4, 5]  # query heads of KV heads 1 and 2 (groups of 2)
    _, rows = compress_model(model, 1, "mean-pool", "all")
    assert rows[0]["weak_heads"] == []
    assert weak_heads(torch.ones(1, 6), torch.ones(1, 6)) == []
    assert weak_heads(torch.tensor([[1.0, 0.2, 1.0]]), torch.tensor([[1.0, 1.0, -0.1]])) == [1, 2]
    # The command reports them per layer and warns.
    run = save_run(model, tmp_path / "run")
    report = convert(str(run), 1, init="svd", out=str(tmp_path / "kv1"), calib_tokens=0)
    assert report["per_layer"][0]["weak_heads"] == [2, 3, 4, 5]
    assert "warning: 4 of 6 query heads" in capsys.readouterr().err
    assert json.loads((tmp_path / "kv1" / "conversion.json").read_text())["per_layer"][0]["weak_heads"] == [2, 3, 4, 5]


def test_rope_commutes_with_the_fit():
    """The weight-space fit is a fit of post-RoPE keys with the same error: RoPE rotates every head
    alike, so rotate(mix^T K_comp) = mix^T rotate(K_comp) and rotations keep norms."""
    from mea.layers.rope import RotaryEmbedding, apply_rope
    from mea.ops.attention import mix_heads

    h, hk, d, D, L = 6, 2, 8, 16, 7
    w = torch.randn(h, d, D, dtype=torch.float64)
    x = torch.randn(1, L, D, dtype=torch.float64)
    w_comp, mix = fit_components(w, hk, "svd")
    cos, sin = RotaryEmbedding(d)(torch.arange(L)[None], torch.float64)
    k = apply_rope(torch.einsum("icD,blD->bilc", w, x), cos, sin)
    k_comp = apply_rope(torch.einsum("jcD,blD->bjlc", w_comp, x), cos, sin)
    k_hat = mix_heads(k_comp, mix)
    k_hat_pre = apply_rope(torch.einsum("icD,blD->bilc", rebuilt(mix, w_comp), x), cos, sin)
    torch.testing.assert_close(k_hat, k_hat_pre)
    pre = torch.einsum("icD,blD->bilc", w - rebuilt(mix, w_comp), x)
    # RoPE tables are computed in fp32, so the rotation is orthogonal to fp32 precision.
    assert float(torch.linalg.norm(k - k_hat)) == pytest.approx(float(torch.linalg.norm(pre)), rel=1e-6)


# ------------------------------------------------------------------------ converting a model
@pytest.mark.parametrize("attention,n_kv_heads", [("gqa", 3), ("mha", 6), ("gqa", 1)])
@pytest.mark.parametrize("init", ["svd", "activation", "mean-pool"])
def test_exact_at_unchanged_head_count(attention, n_kv_heads, init):
    model = tiny(attention, n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 97, (2, 24))
    covs, n = input_covariances(model, [ids], progress=False)
    assert n == ids.numel()
    new, rows = compress_model(model, n_kv_heads, init, "all", covs)
    assert new.config.attention == "mea" and new.config.n_kv_heads == n_kv_heads
    assert new.config.head_norm is False and new.config.layer_kv_heads is None
    with torch.no_grad():
        torch.testing.assert_close(new(ids), model(ids), atol=1e-5, rtol=0)
    assert all(r["k_rel_err"] < 1e-6 and r["v_rel_err"] < 1e-6 for r in rows)


def test_exact_for_an_mea_source_with_head_norm():
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=4, attention="mea")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_mix.normal_()
            layer.self_attn.v_mix.normal_()
            layer.self_attn.head_norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 97, (1, 16))
    new, _ = compress_model(model, 4, "svd")
    assert new.config.head_norm is True
    with torch.no_grad():
        torch.testing.assert_close(new(ids), model(ids), atol=1e-5, rtol=0)


def test_compressed_cache_holds_h_prime_heads():
    model = tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=3)
    new, rows = compress_model(model, 2, "svd")
    B, T = 2, 10
    ids = torch.randint(0, 97, (B, T))
    cache_old = KVCache.for_model(model.config, B, T)
    cache_new = KVCache.for_model(new.config, B, T)
    with torch.no_grad():
        model(ids, cache=cache_old)
        prefill = new(ids[:, :6], cache=cache_new)
        step = new(ids[:, 6:], cache=cache_new)
        full = new(ids)
    assert all(k.shape[1] == 2 for k in cache_new.k + cache_new.v)
    d = model.config.head_dim
    assert cache_new.nbytes() == 3 * 2 * 2 * d * 4 * B * T  # layers * (K,V) * h' * d * fp32 * tokens
    assert cache_new.nbytes() * 3 == cache_old.nbytes() * 2
    assert new.config.kv_cache_bytes_per_token == sum(r["kv_bytes_per_token_after"] for r in rows)
    # Decoding from the h'-head cache is the converted model's function.
    torch.testing.assert_close(torch.cat([prefill, step], 1), full, atol=1e-5, rtol=0)


def test_layers_subset_leaves_other_layers_alone():
    model = tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=4)
    ids = torch.randint(0, 97, (2, 12))
    covs, _ = input_covariances(model, [ids], progress=False)
    new, rows = compress_model(model, 1, "activation", "1-2", covs)
    assert new.config.layer_kv_heads == [3, 1, 1, 3] and new.config.n_kv_heads == 1
    assert [r["compressed"] for r in rows] == [False, True, True, False]
    for i in (0, 3):
        old_a, new_a = model.model.layers[i].self_attn, new.model.layers[i].self_attn
        for a, b in zip(effective_head_weights(old_a), effective_head_weights(new_a)):
            torch.testing.assert_close(a, b)
        assert rows[i]["k_rel_err"] < 1e-7
    assert all(rows[i]["k_rel_err"] > 1e-3 for i in (1, 2))
    cache = KVCache.for_model(new.config, 1, 4)
    assert [k.shape[1] for k in cache.k] == [3, 1, 1, 3]
    # The first layer is untouched, so its output is bit-for-bit the source's.
    assert torch.equal(new.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    # The report's cache sizes match the cache a converted model really allocates.
    assert sum(r["kv_bytes_per_token_after"] for r in rows) == new.config.kv_cache_bytes_per_token


def test_activation_fit_beats_svd_on_calibration_keys():
    model = tiny("mha", n_heads=6, n_kv_heads=6, n_layers=2)
    ids = torch.randint(0, 97, (4, 32))
    covs, _ = input_covariances(model, [ids], progress=False)
    _, rows_svd = compress_model(model, 2, "svd", "all", covs)
    _, rows_act = compress_model(model, 2, "activation", "all", covs)
    _, rows_mp = compress_model(model, 2, "mean-pool", "all", covs)
    for s, a, m in zip(rows_svd, rows_act, rows_mp):
        assert a["k_rel_err"] <= s["k_rel_err"] + 1e-12 and a["v_rel_err"] <= s["v_rel_err"] + 1e-12
        assert s["k_rel_err_weights"] <= m["k_rel_err_weights"] + 1e-12


def test_calibration_windows_and_an_empty_layer_list(tmp_path):
    from mea.convert.convert import calibration_tokens, check_request
    from mea.data.windows import fixed_windows

    ids = torch.arange(2000)
    assert fixed_windows(ids, 512, max_windows=1).shape == (1, 512)
    assert torch.equal(fixed_windows(ids, 512, max_windows=2), ids[:1024].view(2, 512))
    assert torch.equal(fixed_windows(ids, 11, 10)[1], ids[10:21])  # the trainer's windows: one token of overlap
    assert fixed_windows(torch.arange(100), 512).shape == (0, 512)
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_TEXT)
    n = len(__import__("mea.data.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer().encode(CALIB_TEXT))
    assert n >= 64
    assert calibration_tokens(None, 50304, 16, 32, str(text)).shape == (1, 32)  # fewer tokens asked than a window
    assert calibration_tokens(None, 50304, 64, 32, str(text)).shape == (2, 32)
    with pytest.raises(ValueError, match=f"calibration text: {n} tokens"):
        calibration_tokens(None, 50304, 4096, n + 1, str(text))
    with pytest.raises(ValueError, match="calib_seq_len"):
        calibration_tokens(None, 50304, 4096, 1, str(text))
    with pytest.raises(ValueError, match="no layer selected"):
        check_request(tiny("mha", n_heads=4, n_kv_heads=4).config, 2, [])


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("middle", 30) == list(range(7, 22))
    assert parse_layers("middle", 4) == [1, 2]
    assert parse_layers("4-6,0", 8) == [0, 4, 5, 6]
    assert parse_layers("0,2,5", 6) == [0, 2, 5]
    with pytest.raises(ValueError, match="out of range"):
        compress_model(tiny(), 1, "svd", [0, 3])
    for bad, msg in [("7", "out of range"), ("3-9", "out of range"), ("5-2", "backwards"), ("x", "cannot parse"),
                     ("-1", "cannot parse")]:
        with pytest.raises(ValueError, match=msg):
            parse_layers(bad, 6)


# ------------------------------------------------------------------------------ the command
def save_run(model: Transformer, path):
    from mea.io.checkpoint import save_checkpoint

    save_checkpoint(path, 1, model.state_dict(), model.config, {}, {"step": 1})
    return path


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(kv_heads=0), ValueError, "kv_heads"),
    (dict(kv_heads=7), ValueError, "kv_heads"),        # more than the 6 query heads
    (dict(kv_heads=4), ValueError, "enlarge"),         # more than the 3 stored heads
    (dict(kv_heads=2, layers="0-5"), ValueError, "out of range"),
    (dict(kv_heads=2, init="pca"), ValueError, "init"),
    (dict(kv_heads=2, init="activation", calib_tokens=0), ValueError, "calib_tokens"),
])
def test_bad_requests_write_nothing(tmp_path, kwargs, exc, msg):
    run = save_run(tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=3), tmp_path / "run")
    out = tmp_path / "out"
    with pytest.raises(exc, match=msg):
        convert(str(run), out=str(out), calib_tokens=kwargs.pop("calib_tokens", 0), **kwargs)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unsupported_architectures_write_nothing(tmp_path):
    out = tmp_path / "out"
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, attention="diff")
    run = save_run(Transformer(cfg), tmp_path / "diff_run")
    with pytest.raises(ValueError, match="not supported"):
        convert(str(run), 3, out=str(out), calib_tokens=0)
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 12}))
    (hf / "model.safetensors").write_bytes(b"")  # (a folder without weights is refused before its model type)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        convert(str(hf), 3, out=str(out), calib_tokens=0)
    with pytest.raises(FileNotFoundError):
        convert(str(tmp_path / "nothing"), 3, out=str(out), calib_tokens=0)
    assert not out.exists()


CALIB_TEXT = (
    "The committee met on a cold morning to weigh the proposal. Several members argued that the cost "
    "of the new bridge would be repaid within a decade, while others doubted the traffic estimates. "
) * 20


def test_convert_run_dir_end_to_end(tmp_path):
    """A mea run -> `mea convert` -> HF folder: the report, the weights and the function agree."""
    from mea.io.hf import load_hf_mea

    src = tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304)
    run = save_run(src, tmp_path / "run")
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_TEXT)
    out = tmp_path / "conv"
    report = convert(str(run), 2, init="activation", layers="1", out=str(out), calib_tokens=256, calib_seq_len=32,
                     calib_text=str(text))
    saved = json.loads((out / "conversion.json").read_text())
    assert saved["per_layer"] == report["per_layer"] and saved["calib_tokens"] == 256
    assert [r["kv_heads_after"] for r in report["per_layer"]] == [4, 2]
    assert report["kv_bytes_per_token_after"] == 2 * (4 + 2) * 8 * 2
    assert (out / "tokenizer.json").is_file()
    loaded = load_hf_mea(out, dtype=torch.float32)
    assert loaded.config.layer_kv_heads == [4, 2]
    # The same conversion in memory, from the same calibration windows.
    from mea.convert.convert import calibration_tokens

    ids = calibration_tokens(None, 50304, 256, 32, str(text))
    covs, _ = input_covariances(src, ids.split(8), progress=False)
    ref, _ = compress_model(src, 2, "activation", "1", covs)
    probe = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), ref(probe), atol=1e-5, rtol=0)
    # transformers' generate() over a cache whose layers hold 4 and 2 heads.
    from mea.models.modeling_mea import MEAForCausalLM

    hf = MEAForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gen = hf.generate(probe[:, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, loaded.generate(probe[:, :5], max_new_tokens=4))
    with pytest.raises(FileExistsError):
        convert(str(run), 2, out=str(out), calib_tokens=0)


def test_convert_hf_llama_folder_is_exact_at_unchanged_heads(tmp_path):
    """An HF GQA LLaMA converted at its own KV-head count reproduces LlamaForCausalLM's logits, and
    the converted folder generates through transformers with a cache of h' heads."""
    transformers = pytest.importorskip("transformers")
    from mea.data.tokenizer import save_hf_tokenizer
    from mea.models.modeling_mea import MEAForCausalLM

    cfg = transformers.LlamaConfig(vocab_size=50304, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "llama"
    llama.save_pretrained(src)
    save_hf_tokenizer(src, model_max_length=128)
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_TEXT)
    probe = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        want = llama(probe).logits
    for init in ("svd", "activation", "mean-pool"):
        out = tmp_path / f"kv3-{init}"
        convert(str(src), 3, init=init, out=str(out), calib_tokens=128, calib_seq_len=32, calib_text=str(text))
        hf = MEAForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(probe).logits, want, atol=1e-5, rtol=0)
    out = tmp_path / "kv1"
    out.mkdir()  # an empty folder made beforehand is fine: it used to pass the check and fail at the end
    # calib_tokens below one window still takes one window of the text (the corpus path does the same)
    report = convert(str(src), 1, init="svd", out=str(out), calib_tokens=16, calib_seq_len=32, calib_text=str(text))
    assert report["calib_tokens"] == 32
    assert report["kv_bytes_per_token_after"] * 3 == report["kv_bytes_per_token_before"]
    assert all(0 < r["k_rel_err"] < 1 for r in report["per_layer"])
    hf = MEAForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gen = hf.generate(probe[:1, :5], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        core = hf.core.generate(probe[:1, :5], max_new_tokens=4)
    assert torch.equal(gen, core)


def tiny_corpus(path):
    """A prepared GPT-2 corpus directory (the format of `mea prepare-data`) from a few sentences."""
    import random

    from mea.data.shards import FORMAT, MANIFEST, ShardWriter
    from mea.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    words = CALIB_TEXT.split()
    rng = random.Random(0)
    path.mkdir()
    splits = {}
    for split, n_docs in (("train", 40), ("val", 8)):
        w = ShardWriter(path, split)
        for _ in range(n_docs):
            w.write(tok.encode(" ".join(rng.choice(words) for _ in range(60))) + [tok.eos_token_id])
        splits[split] = {"shards": w.close(), "tokens": w.num_tokens}
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "complete": True, "splits": splits,
                                             "tokenizer": {"name": "gpt2", "vocab_size": 50257}}))
    return path


@pytest.mark.slow
def test_compression_table_script_tiny(tmp_path):
    """The result-table script end to end at a tiny size: original, each init before and after a
    few healing steps, every row with cache bytes and a finite perplexity."""
    from mea.study import compression_table as mod
    corpus = tiny_corpus(tmp_path / "corpus")
    run = save_run(tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304), tmp_path / "run")
    out = tmp_path / "table"
    rows = mod.compression_table(str(run), kv_heads=[2], inits=["svd", "mean-pool"], out=str(out), corpus=str(corpus),
                                 calib_tokens=256, val_tokens=128, seq_len=32, heal_steps=2, heal_batch_size=2,
                                 heal_seq_len=32, heal_lr=1e-3, batch_size=2, heal_original=True)
    assert [(r["model"], r["init"]) for r in rows] == [
        ("original", "-"), ("converted", "svd"), ("converted", "mean-pool"), ("healed", "-"), ("healed", "svd"),
        ("healed", "mean-pool")]
    full, half = 2 * 2 * 4 * 8 * 2, 2 * 2 * 2 * 8 * 2
    assert [r["kv_bytes_per_token"] for r in rows] == [full, half, half, full, half, half]
    assert all(math.isfinite(r["val_ppl"]) and r["val_ppl"] > 1 for r in rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["settings"]["val_windows"] == [4, 32]
    assert saved["settings"]["heal_original"] and (out / "original-healed" / "status.json").is_file()
    assert "| healed | 2 | svd |" in (out / "table.md").read_text()
    # Healing changed the weights: a different perplexity from the same start (the control too).
    assert rows[4]["val_ppl"] != rows[1]["val_ppl"] and rows[3]["val_ppl"] != rows[0]["val_ppl"]
    # Zero-shot scored at the end through evaluate-many fills the same rows.
    rows = mod.compression_table(str(run), kv_heads=[2], inits=["svd"], out=str(tmp_path / "t2"), corpus=str(corpus),
                                 calib_tokens=256, val_tokens=128, seq_len=32, heal_steps=1, heal_batch_size=2,
                                 heal_seq_len=32, heal_lr=1e-3, batch_size=2, tasks=["piqa"], limit=2,
                                 zero_shot_before=False, eval_at_end=True)
    assert [("zero_shot" in r) for r in rows] == [True, False, True]
    assert rows[0]["zero_shot"]["limit"] == 2 and 0 <= rows[2]["zero_shot"]["average"] <= 1
    assert (tmp_path / "t2" / "zero_shot" / "table.md").is_file()
    # Stopped while scoring at the end: the scores already written under zero_shot/ are collected.
    saved = json.loads((tmp_path / "t2" / "results.json").read_text())
    for r in saved["rows"]:
        r.pop("zero_shot", None)
    (tmp_path / "t2" / "results.json").write_text(json.dumps(saved))
    assert mod.collect_zero_shot(tmp_path / "t2") == json.loads(json.dumps(rows))
    assert "| piqa | avg |" in (tmp_path / "t2" / "table.md").read_text()


@pytest.mark.slow
def test_compression_table_continues_an_interrupted_call(tmp_path):
    """A second call with the same settings keeps the finished rows (no new conversion, no new
    healing) and heals what the first call left unfinished; other settings in the same folder are a
    clear error."""
    import shutil

    from mea.study import compression_table as mod
    corpus = tiny_corpus(tmp_path / "corpus")
    run = save_run(tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304), tmp_path / "run")
    out = tmp_path / "table"
    kw = dict(kv_heads=[2], inits=["svd", "mean-pool"], out=str(out), corpus=str(corpus), calib_tokens=256,
              val_tokens=128, seq_len=32, heal_steps=2, heal_batch_size=2, heal_seq_len=32, heal_lr=1e-4, batch_size=2)
    first = mod.compression_table(str(run), **kw)
    stamps = {p.name: (p / "conversion.json").stat().st_mtime_ns for p in out.glob("kv2-*") if not p.name.endswith("healed")}
    # As if the call had been killed while healing mean-pool: its run unfinished, its row not saved.
    shutil.rmtree(out / "kv2-mean-pool-healed" / "checkpoints")
    (out / "kv2-mean-pool-healed" / "status.json").unlink()
    saved = json.loads((out / "results.json").read_text())
    saved["rows"] = saved["rows"][:-1]
    (out / "results.json").write_text(json.dumps(saved))
    svd_metrics = (out / "kv2-svd-healed" / "metrics.jsonl").read_text()
    second = mod.compression_table(str(run), **kw)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(second[:4]) == strip(first[:4])
    assert {p: (out / p / "conversion.json").stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "kv2-svd-healed" / "metrics.jsonl").read_text() == svd_metrics
    assert second[4]["stage"] == first[4]["stage"] and math.isfinite(second[4]["val_ppl"])
    with pytest.raises(ValueError, match="other settings"):
        mod.compression_table(str(run), **{**kw, "heal_lr": 1e-3})
    # The healed-original control only adds a row: the table continues with it.
    third = mod.compression_table(str(run), **{**kw, "heal_original": True})
    assert strip(third[:3]) == strip(second[:3]) and strip(third[4:]) == strip(second[3:])
    assert (third[3]["model"], third[3]["init"]) == ("healed", "-")
    # Another healing seed (its own folder): same conversions, other data order, another healed model.
    other = mod.compression_table(str(run), **{**kw, "out": str(tmp_path / "seed1"), "heal_seed": 1})
    assert strip(other[:3]) == [{**r, "path": r["path"].replace(str(out), str(tmp_path / "seed1"))} for r in strip(second[:3])]
    assert other[3]["val_ppl"] != second[3]["val_ppl"]
    assert json.loads((tmp_path / "seed1" / "results.json").read_text())["settings"]["heal_seed"] == 1


def byte_tokenizer():
    """A tokenizer that is not GPT-2: byte-level characters (256 ids) plus end-of-text (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.WordLevel(chars, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                 pre_tokenizers.Split("", "isolated")])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def byte_llama_folder(path):
    """A tiny random LlamaForCausalLM (260 ids) saved with ``byte_tokenizer``: an HF model whose own
    tokenizer is not GPT-2, as SmolLM2 is."""
    import transformers

    src = byte_tokenizer_folder(path)
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    return src


def byte_tokenizer_folder(path):
    """``byte_tokenizer`` as an HF tokenizer folder."""
    path.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "model_max_length": 128}))
    return path


def test_retokenize_corpus_keeps_the_text(tmp_path):
    """The corpus re-encoded with another tokenizer.json holds the same documents, in the same order."""
    from mea.data.windows import corpus_windows, retokenize_corpus
    from mea.data.shards import TokenDataset, read_manifest
    from mea.data.tokenizer import load_tokenizer

    corpus = tiny_corpus(tmp_path / "corpus")
    # A different vocabulary: byte-level characters only (256 ids plus the end-of-text token).
    tok = byte_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = retokenize_corpus(tmp_path / "tokenizer.json", str(corpus), out=tmp_path / "re", progress=False)
    m = read_manifest(out)
    assert m["tokenizer"]["vocab_size"] == 257 and m["tokenizer"]["eos_token_id"] == 256
    gpt2 = load_tokenizer()
    for split in ("train", "val"):
        src_ids = np.concatenate([np.asarray(s) for s in TokenDataset(corpus, split).shards])
        new_ids = np.concatenate([np.asarray(s) for s in TokenDataset(out, split).shards])
        assert new_ids.max() <= 256 and len(new_ids) > 2 * len(src_ids)
        assert tok.decode(new_ids.tolist(), skip_special_tokens=False) == gpt2.decode(src_ids.tolist())
    # A second call reuses the finished directory.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert retokenize_corpus(tmp_path / "tokenizer.json", str(corpus), out=tmp_path / "re", progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    w = corpus_windows(tmp_path, "val", 64, 16, corpus=str(corpus))
    assert w.shape == (4, 16) and int(w.max()) <= 256


def test_compression_table_takes_a_sweeps_best_run(tmp_path):
    from mea.study import compression_table as mod
    rows = ["variant,lr,seed,status,final_val_loss,best_val_loss,steps,tokens,run_dir",
            "mha,0.001,0,finished,4.0,4.0,10,100,x", "mha,0.003,0,finished,3.5,3.5,10,100,y",
            "mha,0.01,0,diverged,,5.0,3,30,z", "mea,0.003,0,finished,3.0,3.0,10,100,w"]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    assert mod.best_run(str(tmp_path), "mha") == str(tmp_path / "mha" / "lr3.00e-03_s0")
    with pytest.raises(ValueError, match="variant"):
        mod.best_run(str(tmp_path), None)
    with pytest.raises(ValueError, match="diff"):
        mod.best_run(str(tmp_path), "diff")


def test_a_run_continued_from_an_hf_model_keeps_its_tokenizer(tmp_path):
    """`mea pretrain --init_from` a model with its own tokenizer (SmolLM2, or one converted from it)
    keeps that tokenizer in RUN/tokenizer; evaluation and export of the run use it, not GPT-2 (whose
    ids would index past the model's embedding), and a run that lost it is a clear error."""
    import shutil

    pytest.importorskip("transformers")
    from mea.data.windows import retokenize_corpus
    from mea.eval.evaluate import load_for_eval
    from mea.io.hf import export_hf, tokenizer_folder
    from mea.train.pretrain import pretrain
    from mea.train.config import DataConfig, TrainConfig

    src = byte_llama_folder(tmp_path / "llama")
    assert tokenizer_folder(src) == src
    corpus = retokenize_corpus(src / "tokenizer.json", str(tiny_corpus(tmp_path / "corpus")), out=tmp_path / "re",
                               progress=False)
    run = tmp_path / "healed"
    pretrain(out=str(run), init_from=str(src), data=DataConfig(corpus=str(corpus), seq_len=32),
             train=TrainConfig(max_steps=2, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, save_every=2,
                              log_every=1),
             device="cpu", compile=False, progress=False)
    assert tokenizer_folder(run) == run / "tokenizer"
    assert tokenizer_folder(run / "checkpoints" / "latest") == run / "tokenizer"
    _, tok, _ = load_for_eval(str(run))
    assert len(tok) == 257 and tok.encode("ab") == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    out = tmp_path / "exported"
    export_hf(str(run), str(out))
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((src / "tokenizer.json").read_text())
    # A run folder copied without weights or tokenizer.json (as the study packs them) and started again
    # with --resume begins afresh and gets the tokenizer back (it once kept the stale copy).
    shutil.rmtree(run / "checkpoints")
    (run / "tokenizer" / "tokenizer.json").unlink()
    assert tokenizer_folder(run) is None
    pretrain(out=str(run), init_from=str(src), data=DataConfig(corpus=str(corpus), seq_len=32), resume=True,
             train=TrainConfig(max_steps=2, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, save_every=2,
                              log_every=1),
             device="cpu", compile=False, progress=False)
    assert tokenizer_folder(run) == run / "tokenizer"
    assert len(load_for_eval(str(run))[1]) == 257
    shutil.rmtree(run / "tokenizer")
    with pytest.raises(ValueError, match="260 token embeddings but its tokenizer has 50,257"):
        load_for_eval(str(run))


def test_study_compression_configs_name_real_options():
    """Every compression-table config names only options that compression_table has (a typo would
    otherwise surface on the GPU, minutes into a paid run)."""
    import inspect
    from pathlib import Path

    import yaml

    import mea
    from mea.study.compression_table import compression_table

    params = set(inspect.signature(compression_table).parameters)
    root = Path(mea.__file__).resolve().parent / "configs"
    configs = sorted([*(root / "study").glob("*.yaml"), *(root / "compression").glob("*_table.yaml")])
    tables = [c for c in configs if "kv_heads" in (yaml.safe_load(c.read_text()) or {})]
    assert len(tables) >= 5
    for c in tables:
        assert set(yaml.safe_load(c.read_text())) <= params, c.name


def test_convert_needs_the_models_own_fast_tokenizer(tmp_path):
    """A LLaMA folder without tokenizer files, or with a tokenizer that has no tokenizer.json, is a clear
    error before anything is written (calibration would otherwise read GPT-2 ids as the model's)."""
    import transformers

    from mea.convert.convert import source_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        convert(str(src), 1, out=str(out), calib_tokens=0)
    (src / "tokenizer.model").write_bytes(b"sentencepiece")  # a slow tokenizer only
    with pytest.raises(ValueError, match="no tokenizer.json"):
        convert(str(src), 1, out=str(out), calib_tokens=0)
    assert not out.exists()
    byte_tokenizer().save(str(src / "tokenizer.json"))
    assert source_tokenizer(src) == src


@pytest.mark.slow
def test_compression_table_continues_from_results_without_weights(tmp_path):
    """A results folder that travelled without weights (the GPU study packs metrics only) continues:
    what is scored stays, a model whose zero-shot is missing gets its weights back by converting or
    healing again, and nothing else is redone."""
    import shutil
    from pathlib import Path

    from mea.study import compression_table as mod
    corpus = tiny_corpus(tmp_path / "corpus")
    run = save_run(tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304), tmp_path / "run")
    out = tmp_path / "table"
    kw = dict(kv_heads=[2], inits=["svd", "mean-pool"], out=str(out), corpus=str(corpus), calib_tokens=256,
              val_tokens=128, seq_len=32, heal_steps=1, heal_batch_size=2, heal_seq_len=32, heal_lr=1e-4, batch_size=2,
              tasks=["piqa"], limit=2, eval_at_end=True)
    first = mod.compression_table(str(run), **kw)
    for d in out.glob("kv2-*"):  # as packed: no weights anywhere
        shutil.rmtree(d / "checkpoints") if d.name.endswith("healed") else (d / "model.safetensors").unlink()
    saved = json.loads((out / "results.json").read_text())
    for r in saved["rows"]:  # as if the scoring of these two had been cut off
        if Path(r["path"]).name in ("kv2-mean-pool", "kv2-svd-healed"):
            r.pop("zero_shot")
            shutil.rmtree(out / "zero_shot" / Path(r["path"]).name)
    (out / "results.json").write_text(json.dumps(saved))
    stamp = lambda p: (out / p / "conversion.json").stat().st_mtime_ns
    before = {p: stamp(p) for p in ("kv2-svd", "kv2-mean-pool")}
    second = mod.compression_table(str(run), **kw)
    assert all("zero_shot" in r for r in second)
    assert stamp("kv2-mean-pool") != before["kv2-mean-pool"]  # converted again: its scores were missing
    assert stamp("kv2-svd") != before["kv2-svd"]  # converted again: its healing had to run again
    assert (out / "kv2-svd-healed" / "checkpoints").is_dir()
    assert not (out / "kv2-mean-pool-healed" / "checkpoints").exists()  # scored and finished: left alone
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "zero_shot")}
    assert [strip(r) for r in second][:3] == [strip(r) for r in json.loads(json.dumps(first))][:3]


def test_compression_table_stopped_early_keeps_the_rows_it_had_not_reached(tmp_path, monkeypatch):
    """A continuing call stopped in slow early work (here: healing the control that an added
    --heal_original asks for) keeps the finished rows it had not reached in results.json; they used to
    vanish, and the next call then tried to load a healed run without weights."""
    import shutil

    from mea.study import compression_table as mod
    corpus = tiny_corpus(tmp_path / "corpus")
    run = save_run(tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304), tmp_path / "run")
    out = tmp_path / "table"
    kw = dict(kv_heads=[2], inits=["svd"], out=str(out), corpus=str(corpus), calib_tokens=256, val_tokens=128,
              seq_len=32, heal_steps=1, heal_batch_size=2, heal_seq_len=32, heal_lr=1e-4, batch_size=2)
    mod.compression_table(str(run), **kw)
    keys = lambda: [(r["model"], r["init"]) for r in json.loads((out / "results.json").read_text())["rows"]]
    first = keys()
    assert ("healed", "svd") in first
    for d in out.glob("kv2-*"):  # packed: no weights
        shutil.rmtree(d / "checkpoints") if d.name.endswith("healed") else (d / "model.safetensors").unlink()
    import mea.train.pretrain as P

    def stopped(*a, **k):
        raise KeyboardInterrupt("the stage's time limit")

    monkeypatch.setattr(P, "pretrain", stopped)
    with pytest.raises(KeyboardInterrupt):
        mod.compression_table(str(run), **kw, heal_original=True)
    assert set(first) <= set(keys())
    monkeypatch.undo()
    rows = mod.compression_table(str(run), **kw, heal_original=True)
    assert {(r["model"], r["init"]) for r in rows} == set(first) | {("healed", "-")}

    # a table scored under an earlier task definition is not continued with scores of the current one
    saved = json.loads((out / "results.json").read_text())
    saved["settings"]["tasks"] = ["piqa"]
    (out / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings"):
        mod.compression_table(str(run), **kw, heal_original=True, tasks=["piqa"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibration_on_the_gpu_matches_the_cpu(tmp_path):
    """`calibrate(device="cuda")` gives the CPU's covariances (fp32 forward, float64 sums) and leaves the
    model on the CPU."""
    from mea.convert.convert import calibrate

    model = tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304)
    corpus = tiny_corpus(tmp_path / "corpus")
    cpu = calibrate(model, None, 256, 32, corpus=str(corpus), batch_size=2)
    gpu = calibrate(model, None, 256, 32, corpus=str(corpus), batch_size=2, device="cuda")
    assert next(model.parameters()).device.type == "cpu" and gpu.n_tokens == cpu.n_tokens
    for a, b in zip(cpu.covariances, gpu.covariances):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item())


def test_pretrain_init_from_reads_the_corpus_in_the_models_tokens(tmp_path):
    """`mea pretrain --init_from` a model with its own tokenizer and a GPT-2 corpus re-tokenizes the
    corpus for it (GPT-2 ids would silently mean other tokens); a corpus already in the model's
    tokenizer, even one whose tokenizer.json was re-saved, is used as it is; a GPT-2 model given a
    re-tokenized corpus reads its GPT-2 source; a corpus with no known source is a clear error."""
    import shutil

    import yaml

    transformers = pytest.importorskip("transformers")
    from mea.data.windows import corpus_in_model_tokens
    from mea.data.shards import read_manifest
    from mea.train.config import DataConfig, TrainConfig
    from mea.train.pretrain import pretrain

    src = byte_llama_folder(tmp_path / "llama")
    gpt2 = tiny_corpus(tmp_path / "corpus")
    run = tmp_path / "healed"
    pretrain(out=str(run), init_from=str(src), data=DataConfig(corpus=str(gpt2), seq_len=32),
             train=TrainConfig(max_steps=1, batch_size=2, warmup_steps=1, eval_every=1, eval_batches=1, save_every=1,
                               log_every=1),
             device="cpu", compile=False, progress=False)
    used = yaml.safe_load((run / "config.yaml").read_text())["data"]["corpus"]
    assert used != str(gpt2) and read_manifest(used)["tokenizer"]["vocab_size"] == 257
    assert corpus_in_model_tokens(used, src) == used
    resaved = tmp_path / "resaved"
    transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(resaved))
    assert corpus_in_model_tokens(used, resaved) == used
    assert corpus_in_model_tokens(used, None) == str(gpt2.resolve())
    assert corpus_in_model_tokens(str(gpt2), None) == str(gpt2)
    orphan = tmp_path / "orphan"
    shutil.copytree(used, orphan)
    m = json.loads((orphan / "manifest.json").read_text())
    m.pop("source")
    (orphan / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="no GPT-2 source"):
        corpus_in_model_tokens(str(orphan), None)


def test_saved_folders_keep_the_tokenizers_special_ids(tmp_path):
    """eos, bos and pad ids of the source's tokenizer reach config.json and generation_config.json
    (a converted SmolLM2 folder used to keep only eos, dropping its pad id)."""
    import transformers

    from mea.io.hf import save_hf

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(byte_tokenizer_folder(tmp_path / "tok")))
    tok.add_special_tokens({"pad_token": "<pad>", "bos_token": "<s>"})
    model = tiny("mha", n_heads=4, n_kv_heads=4, vocab_size=len(tok))
    out = save_hf(model, tmp_path / "out", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert cfg[key] == gen[key] == getattr(tok, key) is not None


def test_retokenizing_reads_gpt2_documents_whatever_corpus_it_is_given(tmp_path):
    """From a review: a corpus already re-tokenized was read as GPT-2 ids; a rebuilt source kept its stale
    re-tokenized copy; documents split by a shard file gained a boundary; a tokenizer without
    <|endoftext|> got none (or the literal text). Each now holds."""
    import numpy as np
    from tokenizers import Tokenizer

    from mea.data.windows import (corpus_for_model, corpus_windows, end_of_document_id, gpt2_source,
                                  retokenize_corpus, stream_documents)

    eos = 50256
    docs = [d.tolist() for d in stream_documents([np.array([1, 2, eos, 3, 4]), np.array([5, eos, 6])], eos)]
    assert docs == [[1, 2], [3, 4, 5], [6]]

    gpt2_dir = tiny_corpus(tmp_path / "corpus")
    tok_dir = byte_tokenizer_folder(tmp_path / "tok")
    out = retokenize_corpus(tok_dir / "tokenizer.json", str(gpt2_dir), out=tmp_path / "re", progress=False)
    assert gpt2_source(str(out)).resolve() == gpt2_dir.resolve()
    assert corpus_for_model(None, str(out)).resolve() == gpt2_dir.resolve()  # a GPT-2 model reads GPT-2 ids
    again = retokenize_corpus(tok_dir / "tokenizer.json", str(out), out=tmp_path / "re", progress=False)
    assert again == out  # given the re-tokenized corpus, its GPT-2 source is what is read (and cached)
    want = corpus_windows(tok_dir, "val", 64, 16, corpus=str(gpt2_dir))
    assert torch.equal(corpus_windows(tok_dir, "val", 64, 16, corpus=str(out)), want)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    manifest = json.loads((gpt2_dir / "manifest.json").read_text())
    (gpt2_dir / "manifest.json").write_text(json.dumps({**manifest, "rebuilt": True}))  # the source, prepared again
    retokenize_corpus(tok_dir / "tokenizer.json", str(gpt2_dir), out=tmp_path / "re", progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp
    # a tokenizer whose documents end in </s>: that is the boundary, in the corpus and in the windows
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.add_special_tokens(["</s>"])
    other = tmp_path / "tok2"
    other.mkdir()
    tok.save(str(other / "tokenizer.json"))
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    raw = json.loads((other / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|endoftext|>"]
    (other / "tokenizer.json").write_text(json.dumps(raw))
    end = end_of_document_id(other / "tokenizer.json")
    assert end == Tokenizer.from_file(str(other / "tokenizer.json")).token_to_id("</s>")
    re2 = retokenize_corpus(other / "tokenizer.json", str(gpt2_dir), out=tmp_path / "re2", progress=False)
    ids = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in sorted(re2.glob("val_*.bin"))])
    assert int((ids == end).sum()) == 8  # tiny_corpus's val split: 8 documents, each ends in </s>
    text = Tokenizer.from_file(str(other / "tokenizer.json")).decode(
        corpus_windows(other, "val", 64, 16, corpus=str(gpt2_dir)).flatten().tolist())
    assert "endoftext" not in text


# ------------------------------------------------------------------------------------ query-aware fit
def exact_logit_errors(model, new, ids):
    """Per layer, ||S - S_hat|| / ||S|| of the post-RoPE attention logits q_i . k_i over every causal pair of
    the windows ``ids``, both models' layers fed the original model's layer inputs."""
    from mea.layers.rope import apply_rope

    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model.hidden_states(ids)
    for hk in hooks:
        hk.remove()
    errs = []
    for i, (lo, ln) in enumerate(zip(model.model.layers, new.model.layers)):
        x, a = seen[i]
        B, L, D = x.shape

        def logits(attn):
            h, d = attn.n_heads, attn.head_dim
            wk, _ = effective_head_weights(attn)
            q = apply_rope(attn.q_proj(x).detach().view(B, L, h, d).transpose(1, 2).double(), a.cos.double(), a.sin.double())
            k = apply_rope(torch.einsum("blD,hcD->bhlc", x.double(), wk), a.cos.double(), a.sin.double())
            return (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), 0)

        s, s_hat = logits(lo.self_attn), logits(ln.self_attn)
        errs.append(float((s - s_hat).norm() / s.norm()))
    return errs


def test_query_aware_fit_lowers_the_logit_error():
    """The query init fits the attention logits: on the calibration text it was fitted on, its logit error
    (measured exactly, post-RoPE, over all causal pairs) is below svd's in every layer, and its own
    objective (reported as k_logit_rel_err / v_out_rel_err) is never above activation's or mean-pool's,
    where its alternating least squares starts."""
    from mea.convert.calibration import collect_statistics

    model = tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=2)
    ids = torch.randint(0, 97, (4, 32))
    covs, stats, _ = collect_statistics(model, [ids], attention=True, progress=False)
    assert torch.allclose(covs[0], input_covariances(model, [ids], progress=False)[0][0])
    conv = {init: compress_model(model, 1, init, "all", covs, stats) for init in ("svd", "activation", "mean-pool", "query")}
    q_err, svd_err = exact_logit_errors(model, conv["query"][0], ids), exact_logit_errors(model, conv["svd"][0], ids)
    assert all(q < s for q, s in zip(q_err, svd_err)), (q_err, svd_err)
    for other in ("activation", "mean-pool"):
        for rq, ro in zip(conv["query"][1], conv[other][1]):
            assert rq["k_logit_rel_err"] <= ro["k_logit_rel_err"] + 1e-9
            assert rq["v_out_rel_err"] <= ro["v_out_rel_err"] + 1e-9
    with pytest.raises(ValueError, match="attention statistics"):
        compress_model(model, 1, "query", "all", covs)


def test_weighted_fit_with_identity_weights_is_the_activation_fit():
    from mea.convert.heads import fit_weighted, rebuilt_heads, relative_weighted_error, rope_plane_average

    h, hk, d, D = 6, 2, 4, 12
    w = torch.randn(h, d, D, dtype=torch.float64)
    x = anisotropic_inputs(500, D)
    cov = x.T @ x
    eye = torch.eye(d, dtype=torch.float64).expand(h, d, d)
    wc, mix = fit_weighted(w, hk, eye, cov)
    ac, am = fit_components(w, hk, "activation", cov)
    assert relative_weighted_error(w, rebuilt_heads(mix, wc), eye, cov) == pytest.approx(
        relative_error(w, rebuilt_heads(am, ac), cov), rel=1e-9)
    torch.testing.assert_close(mix @ mix.T, (h / hk) * torch.eye(hk, dtype=torch.float64))
    # RoPE's average of a query moment: each rotation plane (c, c + d/2) keeps its energy, nothing else.
    s = torch.tensor([[4.0, 1.0, 2.0, 0.5], [1.0, 2.0, 0.3, 3.0], [2.0, 0.3, 6.0, 1.0], [0.5, 3.0, 1.0, 8.0]])
    assert torch.equal(rope_plane_average(s), torch.diag(torch.tensor([5.0, 5.0, 5.0, 5.0])))


# ------------------------------------------------------------------------------------ a cache budget
def test_allocate_heads_is_the_exact_optimum():
    import itertools

    from mea.convert.convert import allocate_heads

    g = torch.Generator().manual_seed(3)
    current = [3, 3, 2, 3, 1]
    costs = {l: {h: float(torch.rand(1, generator=g)) * (current[l] - h) for h in range(1, current[l])}
             for l in range(5) if current[l] > 1}
    for total in range(5, sum(current) + 1):
        got = allocate_heads(costs, current, total)
        assert sum(got) == total and all(1 <= a <= c for a, c in zip(got, current))
        best = min(sum(costs.get(l, {}).get(a, 0.0) for l, a in enumerate(alloc))
                   for alloc in itertools.product(*[range(1, c + 1) for c in current]) if sum(alloc) == total)
        assert sum(costs.get(l, {}).get(a, 0.0) for l, a in enumerate(got)) == pytest.approx(best)


def test_kv_budget_meets_the_budget_exactly_from_measured_sensitivity(tmp_path):
    """`mea convert --kv_budget 0.5`: the stored heads sum to exactly half; a layer whose KV heads are one
    head repeated loses nothing at h' = 1 (KL 0), so the budget takes its heads first; conversion.json
    keeps the per-layer measurements."""
    model = tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=4, vocab_size=50304, max_seq_len=64)
    d = model.config.head_dim
    with torch.no_grad():
        for w in (model.model.layers[2].self_attn.k_proj.weight, model.model.layers[2].self_attn.v_proj.weight):
            w.copy_(w[:d].repeat(3, 1))  # three copies of one head: rank one
    run = save_run(model, tmp_path / "run")
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_TEXT)
    report = convert(str(run), kv_budget=0.5, init="activation", out=str(tmp_path / "half"), calib_tokens=128,
                     calib_seq_len=32, calib_text=str(text), sensitivity_tokens=64)
    budget = report["kv_budget"]
    assert budget["heads"] == 6 and sum(report["layer_kv_heads"]) == 6 and report["kv_heads"] is None
    assert report["layer_kv_heads"][2] == 1 and budget["sensitivity"]["2"]["1"] < 1e-7
    assert all(budget["sensitivity"][str(l)]["1"] > 1e-5 for l in (0, 1, 3))
    assert report["kv_bytes_per_token_after"] * 2 == report["kv_bytes_per_token_before"]
    assert report["cache_fraction"] == 0.5
    saved = json.loads((tmp_path / "half" / "conversion.json").read_text())
    assert saved["kv_budget"]["layer_kv_heads"] == report["layer_kv_heads"]
    from mea.io.load import load_model

    conv = load_model(tmp_path / "half")
    assert [conv.config.kv_heads_at(i) for i in range(4)] == report["layer_kv_heads"]
    # The summed per-layer KL the allocation minimized is no more than that of uniform heads' equal share.
    uniform = sum(budget["sensitivity"][str(l)].get(str(h), 0.0) for l, h in enumerate([2, 1, 2, 1]))
    assert budget["predicted_kl"] <= uniform + 1e-12


@pytest.mark.parametrize("kwargs,msg", [
    (dict(kv_budget=0.2), "smallest feasible budget is 0.3333"),   # 2 of 12 heads < one per layer
    (dict(kv_budget=1.0), "must lie in"),
    (dict(kv_budget=0.5, kv_heads=2), "not both"),
    (dict(), "one of them"),
    (dict(kv_budget=0.5, calib_tokens=0), "calib_tokens"),
])
def test_bad_budgets_write_nothing(tmp_path, kwargs, msg):
    run = save_run(tiny("gqa", n_heads=6, n_kv_heads=3, n_layers=4), tmp_path / "run")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=msg):
        convert(str(run), out=str(out), calib_tokens=kwargs.pop("calib_tokens", 64), **kwargs)
    assert not out.exists()


# ------------------------------------------------------------------------------------ attention-output matching
def _matching_setup(seed=0):
    torch.manual_seed(seed)
    src = tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=61)
    windows = torch.randint(0, 61, (40, 24), generator=torch.Generator().manual_seed(seed))
    new, _ = compress_model(src, 1, "mean-pool")
    return src, new, windows


def test_matching_lowers_each_layers_held_out_output_error_and_trains_only_what_conversion_changed():
    """Matching trains k_proj, v_proj and the mixes of the compressed layers toward the original layer's
    attention output: the held-out error goes down in every layer; queries, o_proj, the MLPs, the
    embeddings and the original model are untouched."""
    from mea.convert.match import match_attention

    src, new, windows = _matching_setup()
    src_before = {k: v.clone() for k, v in src.state_dict().items()}
    new_before = {k: v.clone() for k, v in new.state_dict().items()}
    rows = match_attention(src, new, windows, [0, 1], steps=60, lr=3e-3, mixing_lr_mult=10.0, batch_size=8,
                           progress=False)
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert r["kept"] and r["out_rel_err_after"] == r["out_rel_err_trained"]
        assert r["out_rel_err_after"] < 0.9 * r["out_rel_err_before"], r  # (h' = 1 of 4 random heads: ~0.84 -> ~0.68)
    for k, v in src.state_dict().items():
        assert torch.equal(v, src_before[k]), k
    changed = {k for k, v in new.state_dict().items() if not torch.equal(v, new_before[k])}
    trained = {f"model.layers.{i}.self_attn.{n}" for i in (0, 1)
               for n in ("k_proj.weight", "v_proj.weight", "k_mix", "v_mix")}
    assert changed == trained
    assert all(p.requires_grad for p in new.parameters())  # flags restored
    # The reported error is the model's: recompute layer 1's held-out error from the trained weights.
    from mea.convert.match import _rel_err, layer_inputs

    xs, a = layer_inputs(src, windows, [1], 8, torch.device("cpu"))
    held = xs[1][-max(1, windows.shape[0] // 16):]
    err = _rel_err(new.model.layers[1].self_attn.eval(), src.model.layers[1].self_attn, held, a, 8, "cpu")
    assert err == pytest.approx(rows[1]["out_rel_err_after"], rel=1e-6)


def test_matching_without_the_mixing_keeps_a_gqa_conversion_gqa():
    """mixing_lr_mult 0 trains k_proj and v_proj only: a mean-pool (GQA) conversion keeps its 0/1
    replication and still gets closer to the original."""
    from mea.convert.match import match_attention

    src, new, windows = _matching_setup(2)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    rows = match_attention(src, new, windows, [0, 1], steps=40, lr=3e-3, mixing_lr_mult=0.0, progress=False)
    assert all(r["out_rel_err_after"] < r["out_rel_err_before"] for r in rows)
    changed = {k for k, v in new.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("k_proj.weight", "v_proj.weight")}


def test_matching_that_makes_a_layer_worse_keeps_the_fit():
    """A learning rate far too high ruins the weights: the held-out error rises, and the layer keeps
    its closed-form fit, bit for bit."""
    from mea.convert.match import match_attention

    src, new, windows = _matching_setup(1)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    rows = match_attention(src, new, windows, [0], steps=5, lr=50.0, mixing_lr_mult=10.0, progress=False)
    assert not rows[0]["kept"] and rows[0]["out_rel_err_trained"] > rows[0]["out_rel_err_before"]
    assert rows[0]["out_rel_err_after"] == rows[0]["out_rel_err_before"]
    for k, v in new.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_convert_with_matching_reports_it_and_the_folder_holds_the_matched_model(tmp_path):
    """`mea convert --match_steps N`: conversion.json has each compressed layer's output error before and
    after and the settings; the folder's model is the matched one (its error is the reported one)."""
    from mea.io.load import load_model

    src = tiny("mha", n_heads=4, n_kv_heads=4, n_layers=2, d_model=32, vocab_size=50304)
    run = save_run(src, tmp_path / "run")
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_TEXT)
    plain = convert(str(run), 1, init="mean-pool", layers="1", out=str(tmp_path / "plain"), calib_tokens=512,
                    calib_seq_len=32, calib_text=str(text), device="cpu")
    report = convert(str(run), 1, init="mean-pool", layers="1", out=str(tmp_path / "matched"), calib_tokens=512,
                     calib_seq_len=32, calib_text=str(text), device="cpu", match_steps=30, match_lr=3e-3)
    assert report["match"] == {"steps": 30, "lr": 3e-3, "mixing_lr_mult": 10.0}
    r0, r1 = report["per_layer"]
    assert "out_rel_err_before" not in r0 and "match" not in plain
    assert r1["out_rel_err_after"] < r1["out_rel_err_before"]
    saved = json.loads((tmp_path / "matched" / "conversion.json").read_text())
    assert saved["per_layer"] == report["per_layer"]
    a = load_model(tmp_path / "plain", dtype=torch.float32).model.layers[1].self_attn
    b = load_model(tmp_path / "matched", dtype=torch.float32).model.layers[1].self_attn
    assert not torch.equal(a.k_proj.weight, b.k_proj.weight) and torch.equal(a.q_proj.weight, b.q_proj.weight)
    with pytest.raises(ValueError, match="match_steps"):
        convert(str(run), 1, out=str(tmp_path / "x"), calib_tokens=512, calib_seq_len=32, calib_text=str(text),
                match_steps=-1)
    with pytest.raises(ValueError, match="calib_tokens"):
        convert(str(run), 1, out=str(tmp_path / "x"), calib_tokens=32, calib_seq_len=32, calib_text=str(text),
                match_steps=5)
    assert not (tmp_path / "x").exists()
