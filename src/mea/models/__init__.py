from .config import ATTENTION_VARIANTS, PRESETS, ModelConfig
from .transformer import Transformer

__all__ = ["ATTENTION_VARIANTS", "PRESETS", "ModelConfig", "Transformer"]
