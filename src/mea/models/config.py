"""Model configuration: one dataclass, named presets, parameter and FLOP counts.

What is particular to an attention variant (the stored-head counts it allows, its head norm's
default, its score FLOPs) is asked of its class in ``mea.layers.attention``; parameter counts are
read off the modules themselves (built on the meta device), so nothing here is kept in step by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..layers.attention import ATTENTION_CLASSES
from ..ops.backend import check_backend

ATTENTION_VARIANTS = tuple(ATTENTION_CLASSES)
KNOCK_FORMS = ("linear", "mlp")


@dataclass
class ModelConfig:
    """A LLaMA-style decoder with a choice of attention variant.

    ``n_kv_heads`` is the number of stored key/value heads: for ``gqa`` the number of groups (it must
    divide ``n_heads``), for ``mea`` the number h' of component heads (any 1 <= h' <= n_heads).
    ``head_norm=None`` picks the variant's default (on for ``mea`` and ``diff``).
    ``head_norm_init`` is the head norm's initial weight: 1.0 is a plain RMSNorm, whose unit-RMS head
    outputs are several times larger at initialization than un-normalized attention outputs;
    smaller values start the normalized variants at that smaller scale (the Differential
    Transformer's (1 - lambda_init) factor plays this role for ``diff``).
    ``layer_kv_heads`` gives each layer its own stored-head count (KV-cache compression of a subset
    of layers); ``None`` means every layer has ``n_kv_heads``.
    ``backend`` chooses the implementation of MEA's ops, not the model: ``auto``, ``torch`` or
    ``triton`` (see :mod:`mea.ops.backend`); ``Transformer.set_backend`` changes it on a built model.
    ``knock`` adds knocking-heads projections (Zhou et al. 2025) to any variant: the projections it names
    (``"v"``, ``"kv"``, ``"qkv"``, ...: letters of q, k, v) get a (d x d) map shared by their heads, which
    starts as the identity; ``knock_form`` is ``"linear"`` (folds into the projection weight) or ``"mlp"``
    (``2 (x W_up * sigmoid(x W_gate)) W_down``). None: no knocking heads.
    """

    vocab_size: int = 50304
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    attention: str = "mea"
    head_norm: Optional[bool] = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_norm_eps: float = 1e-5
    head_norm_init: float = 1.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    name: str = "custom"
    layer_kv_heads: Optional[list[int]] = None
    backend: str = "auto"
    knock: Optional[str] = None
    knock_form: str = "linear"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_VARIANTS:
            raise ValueError(
                f"attention: unknown variant {self.attention!r}; expected one of {', '.join(ATTENTION_VARIANTS)}"
            )
        check_backend(self.backend)
        cls = ATTENTION_CLASSES[self.attention]
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{key}: must be a positive integer, got {val!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"n_heads: {self.n_heads} does not divide d_model={self.d_model}; "
                    "set head_dim explicitly to use such a head count"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 1:
            raise ValueError(f"head_dim: must be positive, got {self.head_dim}")
        if not self.head_norm_init > 0:
            raise ValueError(f"head_norm_init: must be positive, got {self.head_norm_init!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        h = self.n_heads
        counts = [("n_kv_heads", self.n_kv_heads)]
        if self.layer_kv_heads is not None:
            self.layer_kv_heads = [int(n) for n in self.layer_kv_heads]
            if len(self.layer_kv_heads) != self.n_layers:
                raise ValueError(
                    f"layer_kv_heads: needs one entry per layer ({self.n_layers}), got {len(self.layer_kv_heads)}"
                )
            counts += [(f"layer_kv_heads[{i}]", n) for i, n in enumerate(self.layer_kv_heads)]
        for key, hk in counts:
            if hk < 1:
                raise ValueError(f"{key}: must be >= 1, got {hk}")
            if hk > h:
                raise ValueError(f"{key}: {hk} exceeds n_heads={h} (h' must satisfy 1 <= h' <= h)")
            if cls.kv_heads_rule == "divisor" and h % hk:
                raise ValueError(f"{key}: {self.attention} needs n_kv_heads to divide n_heads, got {hk} and {h}")
            if cls.kv_heads_rule == "all" and hk != h:
                raise ValueError(
                    f"{key}: attention={self.attention!r} stores all heads; got {hk} != n_heads={h} "
                    "(use 'gqa' or 'mea' for fewer stored heads)"
                )
        if self.head_dim % 2:
            raise ValueError(f"head_dim: RoPE rotates pairs of channels, needs an even head_dim, got {self.head_dim}")
        if self.attention == "diff" and self.head_dim % 4:
            raise ValueError(f"head_dim: diff splits each head into two halves that RoPE rotates, needs a head_dim "
                             f"divisible by 4, got {self.head_dim}")
        if self.knock is not None:
            letters = str(self.knock)
            if not letters or set(letters) - set("qkv") or len(set(letters)) != len(letters):
                raise ValueError(f"knock: the projections to knock, some of the letters q, k, v once each "
                                 f"(e.g. 'v', 'kv', 'qkv'), got {self.knock!r}")
            self.knock = "".join(c for c in "qkv" if c in letters)
        if self.knock_form not in KNOCK_FORMS:
            raise ValueError(f"knock_form: expected one of {', '.join(KNOCK_FORMS)}, got {self.knock_form!r}")
        if self.head_norm is None:
            self.head_norm = cls.head_norm_default
        if self.d_ff is None:
            # SwiGLU with 2/3 of the usual 4x width keeps the MLP's parameters at 8 d^2; round to 64.
            self.d_ff = 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        if self.d_ff < 1:
            raise ValueError(f"d_ff: must be positive, got {self.d_ff}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"{bad[0]}: not a ModelConfig field (fields: {', '.join(sorted(fields))})")
        _check_types(overrides)
        kw = dict(PRESETS[name])
        kw.update(name=name)
        asked = overrides.get("attention")
        if asked in ATTENTION_CLASSES and ATTENTION_CLASSES[asked].kv_heads_rule == "all" and "n_kv_heads" not in overrides:
            kw.pop("n_kv_heads", None)  # a GQA preset (smollm2-135m) asked for a variant that stores every head
            kw.pop("layer_kv_heads", None)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise ValueError(f"{bad[0]}: not a ModelConfig field")
        _check_types(d)
        return cls(**d)

    # ------------------------------------------------------------------ sizes
    def kv_heads_at(self, layer: int) -> int:
        """Stored key/value heads of layer ``layer``."""
        return self.n_kv_heads if self.layer_kv_heads is None else self.layer_kv_heads[layer]

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of K and V cache per token over all layers, in bf16/fp16 (2 bytes per element)."""
        return 2 * sum(self.kv_heads_at(i) for i in range(self.n_layers)) * self.head_dim * 2

    def attention_params(self, n_kv_heads: Optional[int] = None) -> int:
        """Parameters of one attention layer with ``n_kv_heads`` stored heads (default ``n_kv_heads``)."""
        hk = self.n_kv_heads if n_kv_heads is None else n_kv_heads
        return _attention_params(self.attention, self.n_heads, hk, self.head_dim, self.d_model, bool(self.head_norm),
                                 self.knock, self.knock_form)

    def num_params(self, non_embedding: bool = False) -> int:
        per_layer = 3 * self.d_model * self.d_ff + 2 * self.d_model
        n = sum(self.attention_params(self.kv_heads_at(i)) + per_layer for i in range(self.n_layers)) + self.d_model
        if non_embedding:
            return n
        emb = self.vocab_size * self.d_model
        return n + emb * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs (forward + backward) per token, for MFU.

        6 N for every weight matmul (lm head included), plus 3x each layer's forward score FLOPs (the
        attention scores and weighted sums, causal, counted as half the full square as in
        FlashAttention's accounting; each variant adds its own extra work, see ``score_flops``), plus 3x
        the weight FLOPs a variant spends beyond 2 per parameter (``extra_flops``: the MLP knock). MEA is
        counted at its minimal work, K and V projected to h' heads; its training path folds the mixing
        into the weights and projects to all h heads, which at h' < h is more (about 5% of the 125m
        model's FLOPs at h' = h/2) and is not counted.
        """
        T = seq_len or self.max_seq_len
        cls = ATTENTION_CLASSES[self.attention]
        matmul_params = self.num_params(non_embedding=True) + self.vocab_size * self.d_model
        extra = sum(cls.extra_flops(self, self.kv_heads_at(i)) for i in range(self.n_layers))
        return 6 * matmul_params + 3 * (self.n_layers * cls.score_flops(self, T) + extra)


@functools.lru_cache(maxsize=256)
def _attention_params(attention: str, n_heads: int, n_kv_heads: int, head_dim: int, d_model: int, head_norm: bool,
                      knock: Optional[str], knock_form: str) -> int:
    """Parameters of one attention layer, counted on a layer built on the meta device (no memory)."""
    import torch

    cfg = ModelConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, attention=attention,
                      head_norm=head_norm, knock=knock, knock_form=knock_form, n_layers=1, vocab_size=1)
    with torch.device("meta"):
        layer = ATTENTION_CLASSES[attention](cfg, 0)
    return sum(p.numel() for p in layer.parameters())


def parse_text_values(values: dict[str, Any]) -> dict[str, Any]:
    """Values typed as text (``--model.d_model 256`` on the command line reaches us as the string
    "256") read as YAML for every field that is not a string; everything else is left as it is."""
    import yaml

    types = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    out = dict(values)
    for key, val in values.items():
        if isinstance(val, str) and key in types and "str" not in types[key]:
            try:
                out[key] = yaml.safe_load(val)
            except yaml.YAMLError:
                pass  # left as text: _check_types names the field
    return out


def _check_types(values: dict[str, Any]) -> None:
    """Reject values of the wrong type (from YAML or the command line) with the field's name."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list[int]": (list, tuple)}
    types = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    for key, val in values.items():
        t = types.get(key, "")
        optional = t.startswith("Optional[")
        base = t[len("Optional["):-1] if optional else t
        if val is None:
            if not optional:
                raise ValueError(f"{key}: must not be None")
            continue
        ok = kinds.get(base)
        if ok and (not isinstance(val, ok) or (base in ("int", "float") and isinstance(val, bool))):
            raise ValueError(f"{key}: expected {base}, got {type(val).__name__} {val!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: trains for a few minutes on a laptop.
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=256),
    # ~4.8M non-embedding parameters.
    "mini": dict(d_model=256, n_layers=6, n_heads=4, max_seq_len=512),
    # ~25M non-embedding parameters: the size of the learning-rate study.
    "small": dict(d_model=512, n_layers=8, n_heads=8, max_seq_len=1024),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    # SmolLM2-135M's shape (the pretrained model that KV-cache compression starts from).
    "smollm2-135m": dict(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        attention="gqa", max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
    ),
}
