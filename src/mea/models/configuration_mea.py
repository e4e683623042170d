"""Hugging Face configuration of a mea model (``model_type = "mea"``).

Every field of :class:`mea.ModelConfig` is stored under its own name; the standard Hugging Face
names (``hidden_size``, ``num_key_value_heads``, ...) are aliases, so transformers' utilities (caches,
generation, device maps) read the right sizes. ``tie_embeddings`` is stored as transformers'
``tie_word_embeddings``.

``save_pretrained`` copies this file next to the weights so that ``trust_remote_code=True`` loads a
saved folder where mea is not installed: mea is then imported from the snapshot of its modeling
code written beside it (``mea_snapshot.py``).
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

try:
    from mea.models.config import ModelConfig
except ImportError:  # a saved folder loaded with trust_remote_code where mea is not installed
    from .mea_snapshot import ModelConfig

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "tie_embeddings"]
_TIE_DEFAULT = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "tie_embeddings")


class MEAConfig(PretrainedConfig):
    """Configuration of :class:`MEAForCausalLM`: the fields of :class:`mea.ModelConfig`, validated by it.

    Build one from a core config with :meth:`from_model_config`, get the core config back with
    :meth:`to_model_config`. Omitted fields take ``ModelConfig``'s defaults (``attention="mea"``), and derived ones
    (``head_dim``, ``n_kv_heads``, ``d_ff``, ``head_norm``) are stored resolved.
    """

    model_type = "mea"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "initializer_range": "init_std",
        "tie_embeddings": "tie_word_embeddings",
    }

    def __init__(self, tie_word_embeddings: bool | None = None, use_cache: bool = True, **kwargs):
        # Standard names given as keyword arguments count as the mea field they alias.
        for hf_name, field in self.attribute_map.items():
            if hf_name in kwargs and field != "tie_word_embeddings":
                kwargs[field] = kwargs.pop(hf_name)
        fields = {k: kwargs.pop(k) for k in _MODEL_FIELDS if k in kwargs}
        tie = _TIE_DEFAULT if tie_word_embeddings is None else bool(tie_word_embeddings)
        resolved = ModelConfig(**fields, tie_embeddings=tie)  # raises ValueError naming a bad field
        for k in _MODEL_FIELDS:
            setattr(self, k, getattr(resolved, k))
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie, **kwargs)

    @classmethod
    def from_model_config(cls, config: "ModelConfig", **kwargs) -> "MEAConfig":
        d = config.to_dict()
        tie = d.pop("tie_embeddings")
        return cls(tie_word_embeddings=tie, **d, **kwargs)

    def to_model_config(self) -> "ModelConfig":
        return ModelConfig(**{k: getattr(self, k) for k in _MODEL_FIELDS}, tie_embeddings=self.tie_word_embeddings)
