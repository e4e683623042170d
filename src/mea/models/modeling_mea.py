"""``MEAForCausalLM``: the core :class:`mea.Transformer` behind Hugging Face's ``PreTrainedModel`` API.

The HF model owns the core model's ``model``, ``lm_head`` and ``rotary`` submodules under the same
names, so its state dict is the core's state dict, key for key: a mea checkpoint and a saved HF
folder hold the same tensors under the same names. The layers themselves are mea's; this file only
adapts the calling conventions (HF's cache objects, 2-D attention masks, output classes).

``generate()`` caches what mea caches: for MEA the h' component heads after RoPE (never the h
composite heads), in a transformers ``DynamicCache`` whose layers therefore hold ``(B, h', T, d)``.

``save_pretrained`` also writes this file, ``configuration_mea.py`` and ``mea_snapshot.py`` (a
snapshot of mea's modeling source) into the folder, with ``auto_map`` in ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works where mea is not
installed. Where mea is installed, the installed library is used.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from mea.layers.attention import Attention, AttnInputs
    from mea.layers.norm import HeadNorm, RMSNorm
    from mea.layers.rope import RotaryEmbedding
    from mea.models.transformer import Transformer
except ImportError:  # a saved folder loaded with trust_remote_code where mea is not installed
    from .mea_snapshot import Attention, AttnInputs, HeadNorm, RMSNorm, RotaryEmbedding, Transformer

from .configuration_mea import MEAConfig

REMOTE_CODE_FILES = ("configuration_mea.py", "modeling_mea.py", "mea_snapshot.py")
AUTO_MAP = {"AutoConfig": "configuration_mea.MEAConfig", "AutoModelForCausalLM": "modeling_mea.MEAForCausalLM"}

# transformers 5.2x renamed the cache argument and output field from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _CacheView:
    """The one method mea's attention layers call on a cache (``update``), backed by a transformers Cache.

    A ``DynamicCache`` returns exactly the keys and values stored so far, which is what mea's layers
    attend over; caches that return a preallocated buffer (static, sliding) would need their padding
    masked, and are refused.
    """

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, positions, kv_len: int) -> tuple[Tensor, Tensor]:
        k, v = self.cache.update(k_new, v_new, layer)
        if k.shape[2] != kv_len:
            raise ValueError(
                f"cache: {type(self.cache).__name__} returned {k.shape[2]} positions where {kv_len} are filled; "
                "MEAForCausalLM supports transformers' DynamicCache (the default of generate())"
            )
        return k, v


class MEAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MEAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the core's own flag: Transformer.gradient_checkpointing
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MEAConfig):
        super().__init__(config)
        self._attach(Transformer(config.to_model_config()))
        self.post_init()

    def _attach(self, core: Transformer) -> None:
        # Register the core's submodules under the core's own names (so the state dicts agree key for
        # key) and keep the core object itself unregistered: it shares these very modules.
        self.model = core.model
        self.lm_head = core.lm_head
        self.rotary = core.rotary
        object.__setattr__(self, "_core", core)
        std = core.config.init_std
        for name, m in core.named_modules():
            if isinstance(m, nn.Linear):  # the core's GPT-2 scaling of residual output projections
                m._mea_init_std = std / (2 * core.config.n_layers) ** 0.5 if name.endswith(("o_proj", "down_proj")) else std

    @classmethod
    def from_core(cls, model: Transformer) -> "MEAForCausalLM":
        """An HF view of ``model``: the returned model shares ``model``'s modules and weights (no copy)."""
        with torch.device("meta"):  # the placeholder core built here is dropped at once
            hf = cls(MEAConfig.from_model_config(model.config))
        hf._attach(model)
        return hf

    @property
    def core(self) -> Transformer:
        """The :class:`mea.Transformer` that shares this model's weights."""
        return self._core

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value
        self._core.lm_head = value

    def _fresh(self, module: nn.Module) -> nn.Module:
        """A newly built module of the same kind as ``module`` (rotary or attention), on the CPU."""
        cfg = self._core.config
        with torch.device("cpu"):
            if isinstance(module, RotaryEmbedding):
                return RotaryEmbedding(2 * module.inv_freq.numel(), cfg.rope_theta)
            return type(module)(cfg, module.layer_idx)

    @torch.no_grad()
    def _refresh(self, module: nn.Module, params: bool) -> None:
        """Rebuild the non-persistent buffers of a rotary or attention module (derived from the config,
        never saved: after meta-device loading they hold garbage), and with ``params`` its own
        parameters that transformers has not marked as loaded."""
        own_params = [(n, p) for n, p in module.named_parameters(recurse=False)
                      if params and not getattr(p, "_is_hf_initialized", False)]
        own_buffers = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if not own_params and not own_buffers:
            return
        fresh = self._fresh(module)
        for n in own_buffers:
            old = module._buffers[n]
            new = fresh._buffers[n]
            module._buffers[n] = new.to(device=old.device, dtype=old.dtype if old.is_floating_point() else new.dtype)
        new_params = dict(fresh.named_parameters(recurse=False))
        for n, p in own_params:
            p.copy_(new_params[n])

    def _refresh_buffers(self) -> None:
        for m in self._core.modules():
            if isinstance(m, (RotaryEmbedding, Attention)):
                self._refresh(m, params=False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, MEAForCausalLM):  # (output_loading_info=True returns a tuple)
            model._refresh_buffers()
        else:
            model[0]._refresh_buffers()
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialize ``module`` the way the core model does (used for fresh models and missing weights).

        Weights that transformers marks as loaded (``_is_hf_initialized``) are left alone.
        """

        def todo(p) -> bool:
            return p is not None and not getattr(p, "_is_hf_initialized", False)

        cfg = self._core.config
        if isinstance(module, (RotaryEmbedding, Attention)):
            self._refresh(module, params=True)
        elif isinstance(module, nn.Linear) and todo(module.weight):
            module.weight.normal_(0.0, getattr(module, "_mea_init_std", cfg.init_std))
        elif isinstance(module, nn.Embedding) and todo(module.weight):
            module.weight.normal_(0.0, cfg.init_std)
        elif isinstance(module, (RMSNorm, HeadNorm)) and todo(module.weight):
            module.weight.fill_(1.0)

    # ------------------------------------------------------------------ forward
    def _cached_hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                              position_ids: Optional[Tensor], cache, states: Optional[list] = None) -> Tensor:
        """Run the core layers over new tokens appended to ``cache`` (HF convention: one past length for
        every row, padding marked in the 2-D ``attention_mask`` over past and new tokens)."""
        core = self._core
        B, L = input_ids.shape
        dev = input_ids.device
        past = cache.get_seq_length()
        T = past + L
        am = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask: expected shape {(B, T)} (past + new tokens), "
                                 f"got {tuple(attention_mask.shape)}")
            am = attention_mask.bool()
        if position_ids is None:
            if am is not None:
                position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
            else:
                position_ids = torch.arange(past, T, device=dev)[None].expand(B, L)
        mask = None
        if am is not None and not bool(am.all()):
            q = torch.arange(past, T, device=dev)[:, None]
            k = torch.arange(T, device=dev)[None, :]
            mask = ((k <= q)[None] & am[:, None, :]) | (k == q)[None]  # a padding query sees itself only
            mask = mask[:, None]
        x = core.model.embed_tokens(input_ids)
        cos, sin = core.rotary(position_ids, x.dtype)
        a = AttnInputs(cos=cos, sin=sin, mask=mask, cache=_CacheView(cache), positions=None, kv_len=T)
        return core.run_layers(x, a, states)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache=None,
        past_key_values=None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted next-token loss when ``labels`` are given), like ``LlamaForCausalLM``."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: not supported by MEAForCausalLM; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids: required")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: expected a 2-D (batch, seq) mask, got {attention_mask.dim()}-D")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self._core.gradient_checkpointing and self.training:
            use_cache = False  # as LlamaForCausalLM: a recomputed layer must not write a cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        want_states = kwargs.pop("output_hidden_states", None)
        want_states = self.config.output_hidden_states if want_states is None else want_states
        states = [] if want_states else None
        if cache is None:
            h = self._core.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         states=states)
        else:
            h = self._cached_hidden_states(input_ids, attention_mask, position_ids, cache, states)
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            # With gradient accumulation, Trainer passes the batch's count of target tokens and expects the
            # sum over them (it then does not divide by the accumulation steps); else the mean.
            n_items = kwargs.pop("num_items_in_batch", None)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100, reduction="mean" if n_items is None else "sum")
            if n_items is not None:
                loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=tuple(states) if states else None,
                                     **{_CACHE_FIELD: cache})
        if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
            return out.to_tuple()
        return out

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus the remote code (see the module docstring)."""
        self.config.auto_map = dict(AUTO_MAP)
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        return out


def write_remote_code(out_dir) -> None:
    """Write configuration_mea.py, modeling_mea.py and mea_snapshot.py into ``out_dir``."""
    try:
        from mea.models.remote_code import write_remote_code as write
    except ImportError:  # running from a saved folder: copy the files this model was loaded from
        def write(out):
            here = Path(__file__).parent
            for name in REMOTE_CODE_FILES:
                if (here / name).resolve() != (Path(out) / name).resolve():
                    shutil.copyfile(here / name, Path(out) / name)
    write(out_dir)
