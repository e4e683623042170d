from .attention import (ATTENTION_CLASSES, Attention, AttnInputs, DiffAttention, DiffV2Attention, MEAttention,
                        TalkingHeadsAttention, build_attention, mixing_init)
from .cache import KVCache
from .mlp import SwiGLU
from .norm import HeadNorm, RMSNorm
from .rope import RotaryEmbedding, apply_rope

__all__ = ["ATTENTION_CLASSES", "Attention", "AttnInputs", "DiffAttention", "DiffV2Attention", "MEAttention",
           "TalkingHeadsAttention", "build_attention", "mixing_init", "KVCache", "SwiGLU", "HeadNorm",
           "RMSNorm", "RotaryEmbedding", "apply_rope"]
