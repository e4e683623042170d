"""mea: Multi-head Explicit Attention (arXiv 2601.19611) and the cross-head attention family."""
from .layers.cache import KVCache
from .models.config import ATTENTION_VARIANTS, PRESETS, ModelConfig
from .models.transformer import Transformer
from . import hf as _hf
from ._version import __version__

_hf.install()  # model_type "mea" in transformers' Auto classes, without importing transformers (see mea.hf)

__all__ = ["ATTENTION_VARIANTS", "PRESETS", "ModelConfig", "Transformer", "KVCache", "__version__"]
