"""A padded batch decodes each prompt as if it were alone: through ``Transformer.generate`` and through
``MEAForCausalLM.generate`` (Hugging Face's loop, its left-padded masks and cache), on every backend.

CPU: the Triton path runs under the interpreter (``TRITON_INTERPRET=1``, set by conftest). GPU: the same
checks at a realistic width. The wrapper's decode of a left-padded batch was once wrong on the GPU: the
kernel took every row's keys to start at slot 0, where Hugging Face's cache keeps the padding.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mea  # noqa: E402
from mea.models.modeling_mea import MEAForCausalLM  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 103
LENGTHS = (5, 9, 13)  # the prompts of the report: two rows padded, one not

VARIANTS = {
    "mea": dict(attention="mea", n_heads=6, n_kv_heads=4),  # h' < h, not a divisor
    "mea-1": dict(attention="mea", n_heads=6, n_kv_heads=1),
    "gqa": dict(attention="gqa", n_heads=6, n_kv_heads=2),
    "mha": dict(attention="mha", n_heads=6),
    "diff": dict(attention="diff", n_heads=6),
    "diff_v2": dict(attention="diff_v2", n_heads=6, n_kv_heads=3),
    "mea-knock": dict(attention="mea", n_heads=6, n_kv_heads=4, knock="qkv", knock_form="mlp"),
}
# The Triton kernels serve MEA; every variant runs on the PyTorch backend.
CASES = [(v, "torch") for v in VARIANTS] + [("mea", "triton"), ("mea-1", "triton")]


def model_for(variant: str, backend: str, d_model: int = 96, device: str = DEV) -> mea.Transformer:
    torch.manual_seed(7)
    cfg = mea.ModelConfig(vocab_size=VOCAB, d_model=d_model, n_layers=2, max_seq_len=64, backend=backend,
                          **VARIANTS[variant])
    model = mea.Transformer(cfg)
    with torch.no_grad():  # off the initialization (identity mixing, unit norms), so every part matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(device).eval()


def prompts(side: str, device: str = DEV):
    """Prompts of LENGTHS tokens padded to the longest on ``side``, with pad id 0 (never a prompt token)."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]
    L = max(LENGTHS)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, sl], am[i, sl] = r, 1
    return [r.to(device) for r in rows], ids.to(device), am.to(device)


def alone_core(model, rows, new):
    return [model.generate(r[None], max_new_tokens=new)[0, len(r):] for r in rows]


def new_tokens(out, ids):
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("variant,backend", CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_core_generate_padded_batch_equals_each_prompt_alone(variant, backend, side):
    model = model_for(variant, backend)
    rows, ids, am = prompts(side)
    want = torch.stack(alone_core(model, rows, 6))
    got = new_tokens(model.generate(ids, attention_mask=am, max_new_tokens=6), ids)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("variant,backend", CASES)
def test_hf_generate_left_padded_batch_equals_each_prompt_alone(variant, backend):
    model = model_for(variant, backend)
    hf = MEAForCausalLM.from_core(model)
    rows, ids, am = prompts("left")
    for loop in ("hf", "mea"):
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, loop=loop)
        want = [hf.generate(r[None], **kw)[0, len(r):] for r in rows]
        got = new_tokens(hf.generate(ids, attention_mask=am, **kw), ids)
        assert torch.equal(got, torch.stack(want)), (loop, got, want)
    # and the core model's tokens, the same function through another loop
    assert torch.equal(got, torch.stack(alone_core(model, rows, 6)))


def test_hf_right_padding_has_holes_that_only_torch_paths_take():
    """Right-padded prompts leave holes between a prompt and its new tokens in transformers' loop and cache:
    the kernel cannot read them, so ``auto`` takes the PyTorch path (the tokens are still each prompt's own),
    and ``triton`` asked for says why it cannot run. mea's own loop packs each row, so it has no holes."""
    rows, ids, am = prompts("right")
    hf = MEAForCausalLM.from_core(model_for("mea", "auto"))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = torch.stack([hf.generate(r[None], loop="hf", **kw)[0, len(r):] for r in rows])
    got = new_tokens(hf.generate(ids, attention_mask=am, loop="hf", **kw), ids)
    assert torch.equal(got, want)
    hf.set_backend("triton")
    assert hf.core.backend == "triton" and hf.config.backend == "triton"
    with pytest.raises(ValueError, match="holes"):
        hf.generate(ids, attention_mask=am, loop="hf", **kw)
    assert torch.equal(new_tokens(hf.generate(ids, attention_mask=am, loop="mea", **kw), ids), want)


def test_backend_is_a_config_field_that_hf_loading_takes(tmp_path):
    """One public switch: ``ModelConfig.backend`` (saved with the model), overridable when loading."""
    model = model_for("mea", "torch", device="cpu")
    assert all(l.self_attn.backend == "torch" for l in model.model.layers)
    MEAForCausalLM.from_core(model).save_pretrained(tmp_path)
    loaded = MEAForCausalLM.from_pretrained(tmp_path, backend="triton")
    assert loaded.config.backend == "triton" and loaded.core.backend == "triton"
    assert all(l.self_attn.backend == "triton" for l in loaded.core.model.layers)
    with pytest.raises(ValueError, match="backend: unknown"):
        mea.ModelConfig(backend="cuda")


def test_fresh_hf_model_takes_the_configs_initialization():
    """``MEAForCausalLM(MEAConfig(...))`` is initialized by the core's own code: head norm at
    ``head_norm_init``, mixing at identity/replication, GPT-2 scaling of the residual projections; and
    model type "mea" means MEA attention unless the config says otherwise."""
    from mea.models.configuration_mea import MEAConfig

    cfg = MEAConfig(vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_norm_init=0.1)
    assert cfg.attention == "mea" and cfg.head_norm
    assert transformers.AutoConfig.for_model("mea").attention == "mea"
    torch.manual_seed(0)
    hf = MEAForCausalLM(cfg)
    attn = hf.core.model.layers[1].self_attn
    assert torch.all(attn.head_norm.weight == 0.1)
    assert torch.equal(attn.k_mix.detach(), mea.layers.mixing_init(2, 4))
    torch.manual_seed(0)
    core = mea.Transformer(cfg.to_model_config())
    o_std = hf.core.model.layers[0].self_attn.o_proj.weight.std().item()
    q_std = hf.core.model.layers[0].self_attn.q_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.004 and abs(o_std - 0.02 / 6 ** 0.5) < 0.002
    assert core.model.layers[1].self_attn.head_norm.weight.eq(0.1).all()


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("variant,backend", [("mea", "auto"), ("mea", "triton"), ("mea-1", "auto"),
                                             ("gqa", "auto"), ("mha", "auto")])
def test_gpu_hf_and_core_left_padded_batches(variant, backend):
    """The report's case on the GPU (fp32, so greedy tokens are exact functions of the prompt): prompts of
    5, 9 and 13 tokens left-padded to 13 give each prompt's own tokens, through both loops."""
    model = model_for(variant, backend, d_model=192)
    hf = MEAForCausalLM.from_core(model)
    rows, ids, am = prompts("left")
    want = torch.stack(alone_core(model, rows, 12))
    core = new_tokens(model.generate(ids, attention_mask=am, max_new_tokens=12), ids)
    assert torch.equal(core, want), (core, want)
    for loop in ("hf", "mea"):
        wrapped = new_tokens(hf.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                         loop=loop), ids)
        assert torch.equal(wrapped, want), (loop, wrapped, want)


@pytest.mark.parametrize("variant", ["mea", "gqa", "diff"])
def test_hf_generate_takes_meas_loop_for_what_it_implements(variant, monkeypatch):
    """``MEAForCausalLM.generate``: ``loop="auto"`` runs mea's loop (packed prefill, CUDA graphs on a GPU)
    for plain greedy/sampled requests and transformers' loop for the rest (beams); ``"mea"`` refuses what it
    does not implement; greedy tokens and output shapes (stopping once every row has finished) agree."""
    from mea.models import generation

    hf = MEAForCausalLM.from_core(model_for(variant, "auto"))
    rows, ids, am = prompts("left")
    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = hf.generate(ids, loop="hf", **kw)
    assert not calls
    assert torch.equal(hf.generate(ids, **kw), want) and len(calls) == 1
    assert torch.equal(hf.generate(ids, loop="mea", **kw), want) and len(calls) == 2
    eos = int(want[0, ids.shape[1] + 1])  # row 0 ends at its 2nd token; the others go on
    kw["eos_token_id"] = eos
    assert torch.equal(hf.generate(ids, loop="mea", **kw), hf.generate(ids, loop="hf", **kw))
    one = dict(kw, attention_mask=am[:1])
    got = hf.generate(ids[:1], loop="mea", **one)
    assert got.shape[1] < ids.shape[1] + 6 and torch.equal(got, hf.generate(ids[:1], loop="hf", **one))
    n = len(calls)
    hf.generate(ids, attention_mask=am, max_new_tokens=3, num_beams=2, pad_token_id=0)
    assert len(calls) == n  # beams: transformers' loop
    with pytest.raises(ValueError, match="does not implement num_beams"):
        hf.generate(ids, attention_mask=am, max_new_tokens=3, num_beams=2, loop="mea")
    torch.manual_seed(0)
    sampled = hf.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=True, top_k=5, loop="mea")
    assert sampled.shape == (3, ids.shape[1] + 5) and torch.equal(sampled[:, :ids.shape[1]], ids)
