"""The chunked training loss (models/loss.py: linear_cross_entropy) against the plain computation:
full logits in fp32, F.cross_entropy, and F.kl_div for distillation."""
import pytest
import torch
import torch.nn.functional as F

from mea import ModelConfig, Transformer
from mea.models.loss import Distill, linear_cross_entropy


def plain(hidden, weight, targets, distill=None, ignore_index=-100):
    """The reference: every logit at once, in fp32."""
    z = F.linear(hidden, weight).float().flatten(0, -2)
    t = targets.flatten()
    ce = F.cross_entropy(z, t, ignore_index=ignore_index)
    if distill is None:
        return ce, ce, None
    T, a = distill.temperature, distill.alpha
    zt = F.linear(distill.hidden, distill.weight).float().flatten(0, -2)
    keep = t != ignore_index
    kl = F.kl_div(F.log_softmax(z[keep] / T, -1), F.log_softmax(zt[keep] / T, -1), log_target=True,
                  reduction="batchmean")
    return (1 - a) * ce + a * T * T * kl, ce, kl


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, retain_graph=True)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 1000])
def test_values_and_gradients_equal_the_plain_loss(chunk_rows):
    """Chunks of 7 rows over 3 x 5 = 15 rows leave a last chunk of 1; ignored targets count nowhere."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(97, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 97, (3, 5), generator=g)
    t[0, 1] = t[2, 4] = -100
    ref, _, _ = plain(h, w, t)
    out = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    torch.testing.assert_close(out.loss, ref)
    assert out.kl is None and out.lm_loss == pytest.approx(out.loss.item())
    for a, b in zip(grads(out.loss * 3.0, h, w), grads(ref * 3.0, h, w)):  # the incoming gradient scales them
        torch.testing.assert_close(a, b)
    # an ignored target's row gets no gradient; another ignore_index is honoured the same way
    assert grads(out.loss, h)[0][0, 1].abs().max() == 0
    t2 = t.clone()
    t2[t2 == -100] = 5
    t2[1, 2] = 5
    torch.testing.assert_close(linear_cross_entropy(h, w, t2, ignore_index=5, chunk_rows=chunk_rows).loss,
                               plain(h, w, t2, ignore_index=5)[0])


def test_no_grad_gives_the_same_value_without_gradients():
    h, w, t = torch.randn(10, 8), torch.randn(33, 8), torch.randint(0, 33, (10,))
    with torch.no_grad():
        out = linear_cross_entropy(h.requires_grad_(), w, t, chunk_rows=3)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, plain(h.detach(), w, t)[0])


def test_bf16_autocast_matches_the_autocast_logits_within_bf16_tolerance():
    """Under autocast the logits of each chunk are computed in bf16, as autocast's lm_head computes them."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(300, 32, generator=g)).requires_grad_()
    t = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(h, w, t)[0]
        out = linear_cross_entropy(h, w, t, chunk_rows=9)
    torch.testing.assert_close(out.loss, ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads(out.loss, h, w), grads(ref, h, w)):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_equals_the_cross_entropy_of_its_logits_for_every_parameter(tie):
    """Through Transformer.loss: the output weight's gradient (a tied embedding's: both of its uses)."""
    cfg = ModelConfig(vocab_size=211, d_model=32, n_layers=2, n_heads=2, attention="mea", n_kv_heads=1,
                      tie_embeddings=tie)
    m = Transformer(cfg)
    x = torch.randint(0, 211, (2, 13))
    ref = F.cross_entropy(m(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
    ref_g = grads(ref, *m.parameters())
    out = m(x[:, :-1], labels=x[:, 1:])
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(m.loss(x[:, :-1], x[:, 1:]), ref)
    for (name, _), a, b in zip(m.named_parameters(), grads(out.loss, *m.parameters()), ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_distillation_terms_equal_the_plain_kl_and_vanish_for_the_same_model():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 6), generator=g)
    t[1, 0] = -100
    d = Distill(torch.randn(2, 6, 8, generator=g), torch.randn(50, 8, generator=g), temperature=2.0, alpha=0.3)
    ref, ref_ce, ref_kl = plain(h, w, t, d)
    out = linear_cross_entropy(h, w, t, d, chunk_rows=5)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.lm_loss, ref_ce)
    torch.testing.assert_close(out.kl, ref_kl)
    assert not out.lm_loss.requires_grad and not out.kl.requires_grad
    for a, b in zip(grads(out.loss, h, w), grads(ref, h, w)):
        torch.testing.assert_close(a, b)
    # the student is the teacher: the KL is zero (to rounding), as is its gradient
    same = linear_cross_entropy(h, w, t, Distill(h.detach(), w.detach(), 2.0, 1.0), chunk_rows=5)
    assert abs(same.kl.item()) < 1e-6 and abs(same.loss.item()) < 1e-5
    assert max(x.abs().max().item() for x in grads(same.loss, h, w)) < 1e-6
    # alpha 0: the loss and its gradients are the plain loss's, bit for bit
    zero = linear_cross_entropy(h, w, t, d._replace(alpha=0.0), chunk_rows=5)
    lm = linear_cross_entropy(h, w, t, chunk_rows=5)
    assert torch.equal(zero.loss, lm.loss)
    for a, b in zip(grads(zero.loss, h, w), grads(lm.loss, h, w)):
        assert torch.equal(a, b)


def test_shape_errors_are_clear():
    h, w = torch.randn(2, 3, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="targets: shape"):
        linear_cross_entropy(h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="distill: the teacher has 21 output ids, the student 20"):
        linear_cross_entropy(h, w, torch.zeros(2, 3, dtype=torch.long), Distill(torch.randn(2, 3, 4), torch.randn(21, 4)))


@pytest.mark.slow
def test_compiled_chunk_arithmetic_matches_eager():
    """torch.compile of the per-chunk softmax arithmetic (what --compile turns on for GPU training)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    d = Distill(torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g), 2.0, 0.3)
    a = linear_cross_entropy(h, w, t, d, chunk_rows=8)
    b = linear_cross_entropy(h, w, t, d, chunk_rows=8, compiled=True)
    torch.testing.assert_close(a.loss, b.loss)
    for x, y in zip(grads(a.loss, h, w), grads(b.loss, h, w)):
        torch.testing.assert_close(x, y)
