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
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from mea.layers.attention import AttnInputs
    from mea.models.transformer import Transformer, padding_mask
except ImportError:  # a saved folder loaded with trust_remote_code where mea is not installed
    from .mea_snapshot import AttnInputs, Transformer, padding_mask

from .configuration_mea import MEAConfig

REMOTE_CODE_FILES = ("configuration_mea.py", "modeling_mea.py", "mea_snapshot.py")
AUTO_MAP = {"AutoConfig": "configuration_mea.MEAConfig", "AutoModelForCausalLM": "modeling_mea.MEAForCausalLM"}

# transformers 5.2x renamed the cache argument and output field from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into preallocated room (doubling when full) instead of
    concatenating: a decoding step then writes one token instead of copying the whole cache. What it
    returns, and ``keys``/``values``, are views of the first ``length`` slots, as DynamicLayer's."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        buf = getattr(self, "_buf", None)
        # Crops and beam reorders replace `keys` by a slice or a copy: keep appending after what is there.
        if buf is None or n + key_states.shape[-2] > buf[0].shape[-2] or n and self.keys.data_ptr() != buf[0].data_ptr():
            room = max(2 * (n + key_states.shape[-2]), 64)
            shape = (*key_states.shape[:2], room, key_states.shape[-1])
            new = (key_states.new_empty(shape), value_states.new_empty(shape[:3] + value_states.shape[-1:]))
            if n:
                new[0][..., :n, :] = self.keys
                new[1][..., :n, :] = self.values
            self._buf = buf = new
        end = n + key_states.shape[-2]
        buf[0][..., n:end, :] = key_states
        buf[1][..., n:end, :] = value_states
        self.keys, self.values = buf[0][..., :end, :], buf[1][..., :end, :]
        return self.keys, self.values


class _CacheView:
    """The one method mea's attention layers call on a cache (``update``), backed by a transformers Cache.

    A ``DynamicCache`` returns exactly the keys and values stored so far, which is what mea's layers
    attend over (its plain layers are swapped for ``_GrowingLayer``s, which append in place); caches that
    return a preallocated buffer (static, sliding) would need their padding masked, and are refused.
    """

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, positions, kv_len: int) -> tuple[Tensor, Tensor]:
        layers = getattr(self.cache, "layers", None)
        if layers is not None and layer < len(layers) and type(layers[layer]) is DynamicLayer \
                and not layers[layer].is_initialized:
            layers[layer] = _GrowingLayer()
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

    def set_backend(self, backend: str) -> "MEAForCausalLM":
        """Choose the implementation of MEA's ops (``auto``, ``torch``, ``triton``; :mod:`mea.ops.backend`),
        in the core model and in this config, so a saved folder keeps it."""
        self._core.set_backend(backend)
        self.config.backend = backend
        return self

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

    def _refresh_buffers(self) -> None:
        """Rebuild the derived buffers (RoPE frequencies, diff's lambda_init), never saved: after
        meta-device loading they hold garbage."""
        for m in self._core.modules():
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # (output_loading_info=True returns a tuple)
        (model if isinstance(model, MEAForCausalLM) else model[0])._refresh_buffers()
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialize ``module``'s own parameters as the core model does (:meth:`Transformer.init_module`):
        for fresh models and for weights missing from a checkpoint. Weights that transformers marks as
        loaded (``_is_hf_initialized``) keep their values."""
        loaded = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)
                  if getattr(p, "_is_hf_initialized", False)}
        self._core.init_module(module)
        for n, value in loaded.items():
            getattr(module, n).copy_(value)

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
        mask = spans = None
        positions = torch.arange(past, T, device=dev)[None].expand(B, L)
        if am is not None and not bool(am.all()):
            mask, spans, positions = padding_mask(am, L, spans=True)
        position_ids = positions if position_ids is None else position_ids
        x = core.model.embed_tokens(input_ids)
        cos, sin = core.rotary(position_ids, x.dtype)
        a = AttnInputs(cos=cos, sin=sin, mask=mask, cache=_CacheView(cache), positions=None, kv_len=T, spans=spans)
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

    # ------------------------------------------------------------------ generation
    # What mea's own loop (mea.models.generation: packed prefill, bucketed CUDA graphs) implements of
    # generate()'s arguments; the generation config may also carry these, and the special-token ids.
    _OWN_LOOP_ARGS = {"input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length", "do_sample",
                      "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "use_cache"}
    _OWN_LOOP_CONFIG = _OWN_LOOP_ARGS | {"bos_token_id", "transformers_version", "_from_model_config"}

    def generate(self, inputs: Optional[Tensor] = None, *args, loop: str = "auto", **kwargs):
        """Hugging Face's ``generate``, or mea's own decoding loop for the requests it implements.

        ``loop``: ``"auto"`` (default) runs mea's loop (``Transformer.generate``: one packed prefill, then
        CUDA-graph decoding steps on a GPU) when every argument and every setting of ``generation_config``
        is one it implements (greedy or sampled with temperature/top_k/top_p, eos and pad ids, a length),
        and transformers' loop otherwise (beams, processors, streamers, scores, ...); ``"hf"`` always runs
        transformers' loop; ``"mea"`` always runs mea's, and an argument it does not implement is an error.
        Both give the same greedy tokens, and the output has transformers' shape: prompt + new tokens,
        ending when every row has finished.
        """
        if loop not in ("auto", "hf", "mea"):
            raise ValueError(f"loop: expected auto, hf or mea, got {loop!r}")
        if loop == "hf":
            return super().generate(inputs, *args, **kwargs)
        unsupported = self._own_loop_unsupported(args, kwargs)
        if unsupported and loop == "auto":
            return super().generate(inputs, *args, **kwargs)
        if unsupported:
            raise ValueError(f"loop: 'mea' does not implement {', '.join(unsupported)}; use loop='hf' or 'auto'")
        return self._own_loop(inputs if inputs is not None else kwargs.get("input_ids"), kwargs)

    def _own_loop_unsupported(self, args: tuple, kwargs: dict) -> list[str]:
        bad = ["positional arguments"] if args else []
        bad += sorted(k for k in kwargs if k not in self._OWN_LOOP_ARGS)
        if kwargs.get("use_cache") is False:
            bad.append("use_cache=False")
        cfg = self.generation_config.to_diff_dict() if self.generation_config is not None else {}
        bad += sorted(f"generation_config.{k}" for k, v in cfg.items()
                      if k not in self._OWN_LOOP_CONFIG and v not in (None, False))
        if not ({"max_new_tokens", "max_length"} & (set(kwargs) | set(cfg))):
            bad.append("a default length (transformers' default differs between versions: give max_new_tokens)")
        eos = kwargs.get("eos_token_id", getattr(self.generation_config, "eos_token_id", None))
        if isinstance(eos, (list, tuple)) and len(eos) > 1:
            bad.append("several eos_token_id")
        return bad

    @torch.no_grad()
    def _own_loop(self, input_ids: Tensor, kwargs: dict) -> Tensor:
        gc = self.generation_config

        def setting(name, default):
            value = kwargs.get(name, getattr(gc, name, None) if gc is not None else None)
            return default if value is None else value

        if input_ids is None:
            raise ValueError("input_ids: required")
        L = input_ids.shape[1]
        new = kwargs.get("max_new_tokens")
        if new is None and "max_length" not in kwargs:
            new = getattr(gc, "max_new_tokens", None)
        if new is None:
            new = max(0, setting("max_length", L) - L)
        eos = setting("eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        sample = bool(setting("do_sample", False))
        steps = []
        out = self._core.generate(
            input_ids, max_new_tokens=int(new), attention_mask=kwargs.get("attention_mask"),
            temperature=float(setting("temperature", 1.0)) if sample else 0.0,
            top_k=int(setting("top_k", 50)) or None if sample else None,
            top_p=float(setting("top_p", 1.0)) if sample else None,
            eos_token_id=eos, pad_token_id=setting("pad_token_id", None), on_token=lambda t: steps.append(1))
        return out[:, :L + len(steps)]  # transformers' loop stops once every row has finished

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
