from .attention import (attention_naive, causal_mask, fold_mix_into_proj, mea_attention_absorbed,
                        mea_attention_reference, mix_heads, sdpa, talking_heads_attention)
from .decode import mea_attention_cached

__all__ = ["attention_naive", "causal_mask", "fold_mix_into_proj", "mea_attention_absorbed",
           "mea_attention_reference", "mix_heads", "sdpa", "talking_heads_attention", "mea_attention_cached"]
