from .attention import (attention_naive, causal_mask, diff_attention, diff_v2_attention, fold_knock_into_proj,
                        fold_mix_into_proj, knock_heads, mea_attention_absorbed, mea_attention_reference, mix_heads,
                        sdpa, talking_heads_attention)
from .backend import BACKENDS
from .decode import mea_attention_cached

__all__ = ["BACKENDS", "attention_naive", "causal_mask", "diff_attention", "diff_v2_attention", "fold_knock_into_proj",
           "fold_mix_into_proj", "knock_heads", "mea_attention_absorbed", "mea_attention_reference", "mix_heads",
           "sdpa", "talking_heads_attention", "mea_attention_cached"]
