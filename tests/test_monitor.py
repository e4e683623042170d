"""mea.train.monitor: the attention logits it reports are the scores each layer softmaxes; the trainer
logs them, and validates on the split data.eval_split names."""
import json
import math

import pytest
import torch

from mea.models.config import ModelConfig
from mea.models.transformer import Transformer
from mea.train.monitor import layer_logits, max_attention_logits

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**TINY, **kw)).eval()
    with torch.no_grad():  # larger queries than the 0.02 init gives: logits far from zero
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
    return m


def _recording(attend, seen: dict):
    """A layer's _attend that also keeps its values and output."""
    def record(q, k, v, a):
        seen["v"], seen["o"] = v, attend(q, k, v, a)
        return seen["o"]
    return record


@pytest.mark.parametrize("kw", [dict(attention="mha"), dict(attention="gqa", n_kv_heads=2),
                                dict(attention="diff"), dict(attention="talking_heads"),
                                dict(attention="mha", head_norm=True)])
@torch.no_grad()
def test_layer_logits_are_the_scores_the_layer_softmaxes(kw):
    """softmax(the monitor's maps) @ V gives back the layer's own attention output, so the maps are the
    real pre-softmax scores (RoPE, groups, DFA's halves and lambda, the talking-heads mixes)."""
    from mea.ops.attention import mix_heads

    m = _model(**kw)
    ids = torch.randint(0, 64, (2, 12))
    states = []
    m.hidden_states(ids, states=states)
    a = m._attn_inputs(ids, None, None, None, torch.float32)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    for layer, x in zip(m.model.layers, states):
        attn, seen = layer.self_attn, {}
        attn._attend = _recording(attn._attend, seen)
        layer(x, a)
        del attn._attend
        v = seen["v"].repeat_interleave(attn.n_heads // seen["v"].shape[1], dim=1)
        probs = [torch.softmax(s.masked_fill(~causal, float("-inf")), -1) for s in layer_logits(attn, layer.input_layernorm(x), a)]
        if kw["attention"] == "diff":
            p = probs[0] - attn.lambda_full() * probs[1]
        elif kw["attention"] == "talking_heads":
            p = mix_heads(probs[0], attn.post_mix)
        else:
            p = probs[0]
        torch.testing.assert_close(p @ v, seen["o"], atol=2e-5, rtol=1e-4)
        assert max(float(s.abs().max()) for s in layer_logits(attn, layer.input_layernorm(x), a)) > 1.0


def test_mea_logits_are_those_of_mha_with_the_folded_keys():
    """MEA's composite keys: the scores of MHA whose key projection has the mixing folded in."""
    from mea.ops.attention import fold_mix_into_proj

    mea = _model(attention="mea", n_kv_heads=2)
    mha = Transformer(ModelConfig(**TINY, attention="mha", head_norm=True)).eval()
    state = {k: v for k, v in mea.state_dict().items() if "_mix" not in k}
    with torch.no_grad():
        for layer in mea.model.layers:  # a mixing away from GQA's replication
            layer.self_attn.k_mix.add_(0.3 * torch.randn_like(layer.self_attn.k_mix))
            layer.self_attn.v_mix.add_(0.3 * torch.randn_like(layer.self_attn.v_mix))
        for i, layer in enumerate(mea.model.layers):
            at = layer.self_attn
            state[f"model.layers.{i}.self_attn.k_proj.weight"] = fold_mix_into_proj(at.k_proj.weight, at.k_mix, at.head_dim)
            state[f"model.layers.{i}.self_attn.v_proj.weight"] = fold_mix_into_proj(at.v_proj.weight, at.v_mix, at.head_dim)
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (3, 16))
    torch.testing.assert_close(mha(ids), mea(ids), atol=1e-5, rtol=1e-4)
    got, want = max_attention_logits(mea, ids), max_attention_logits(mha, ids)
    assert got == pytest.approx(want, rel=1e-5) and min(got) > 1.0


@torch.no_grad()
def test_max_attention_logits_reads_only_the_causal_scores_of_the_first_rows():
    m = _model(attention="mha")
    ids = torch.randint(0, 64, (3, 10))
    full = max_attention_logits(m, ids, rows=3)
    states = []
    m.hidden_states(ids, states=states)
    a = m._attn_inputs(ids, None, None, None, torch.float32)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    for v, layer, x in zip(full, m.model.layers, states):
        s = layer_logits(layer.self_attn, layer.input_layernorm(x), a)[0]
        assert v == pytest.approx(float(s.abs().masked_fill(~causal, 0).max()), rel=1e-6)
        assert v < float(s.abs().max()) or float(s.abs().max()) == float(s.abs().masked_fill(~causal, 0).max())
    assert max(max_attention_logits(m, ids, rows=1)) <= max(full) + 1e-6
    assert m.training is False


def test_pretrain_logs_attention_logits_and_validates_on_the_eval_split(tmp_path):
    """Each evaluation writes the largest attention logit (overall and per layer); `data.eval_split
    select` measures the validation loss on the select split, which differs from val's."""
    from mea.data.prepare import prepare_data
    from mea.train.config import DataConfig, TrainConfig
    from mea.train.metrics import read_metrics
    from mea.train.pretrain import pretrain

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(80):
        (docs / f"d{i}.txt").write_text(" ".join(f"w{(i * 13 + j) % 41} x{j % 7}" for j in range(60 + i)))
    corpus = prepare_data(files=[str(docs)], out=str(tmp_path / "c"), holdout={"val": 1500, "select": 1500})
    finals = {}
    for split in ("val", "select"):
        s = pretrain(out=str(tmp_path / split), preset="tiny", attention="mea", n_kv_heads=2,
                     model={"d_model": 32, "n_layers": 2, "n_heads": 4},
                     data=DataConfig(corpus=corpus, seq_len=32, eval_split=split),
                     train=TrainConfig(max_steps=6, batch_size=2, warmup_steps=1, log_every=1, eval_every=3,
                                       eval_batches=100, save_every=6), device="cpu", progress=False)
        recs = [r for r in read_metrics(tmp_path / split / "metrics.jsonl") if "val_loss" in r]
        assert [r["step"] for r in recs] == [3, 6]
        for r in recs:
            assert len(r["attn_logit_per_layer"]) == 2 and r["max_attn_logit"] == max(r["attn_logit_per_layer"]) > 0
            assert math.isfinite(r["max_attn_logit"])
        finals[split] = s["val_loss"]
    assert finals["val"] != finals["select"]
    import yaml

    assert yaml.safe_load((tmp_path / "select" / "config.yaml").read_text())["data"]["eval_split"] == "select"
    assert json.loads((tmp_path / "select" / "status.json").read_text())["status"] == "finished"
