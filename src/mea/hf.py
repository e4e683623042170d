"""Hugging Face transformers integration: ``model_type = "mea"`` in the Auto classes.

``import mea`` calls :func:`install`, which does not import transformers (``import mea`` stays
light). It registers what it can at once and leaves an import hook for the rest:

- ``MEAConfig`` with ``AutoConfig`` as soon as ``transformers.models.auto.configuration_auto`` exists
  (at once if it was imported before mea, else right after transformers imports it);
- ``MEAForCausalLM`` with ``AutoModelForCausalLM`` likewise, when ``...auto.modeling_auto`` exists.

So after ``import mea``, ``AutoModelForCausalLM.from_pretrained(folder)`` loads a saved mea folder
whatever the order of the imports. :func:`register` does both registrations eagerly. The classes are
also reachable here: ``mea.hf.MEAConfig``, ``mea.hf.MEAForCausalLM`` (importing transformers).
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

MODEL_TYPE = "mea"
_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def _register_config() -> None:
    from transformers import AutoConfig

    from .models.configuration_mea import MEAConfig

    AutoConfig.register(MODEL_TYPE, MEAConfig, exist_ok=True)


def _register_model() -> None:
    from transformers import AutoModelForCausalLM

    from .models.configuration_mea import MEAConfig
    from .models.modeling_mea import MEAForCausalLM

    AutoModelForCausalLM.register(MEAConfig, MEAForCausalLM, exist_ok=True)


_HOOKS = {_CONFIG_MODULE: _register_config, _MODEL_MODULE: _register_model}


def register() -> None:
    """Register ``MEAConfig`` and ``MEAForCausalLM`` with transformers' Auto classes now."""
    _register_config()
    _register_model()


def _run(fn) -> None:
    try:
        fn()
    except Exception as e:  # never break the user's `import transformers` over our registration
        warnings.warn(f"mea: could not register model_type 'mea' with transformers ({e!r}); "
                      "call mea.hf.register() to see the full error", RuntimeWarning, stacklevel=2)


class _LoaderAfter(importlib.abc.Loader):
    """Runs ``after`` once the wrapped loader has executed the module."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run(self._after)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _AutoClassHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers' Auto modules so that mea registers right after they load."""

    def find_spec(self, fullname, path=None, target=None):
        after = _HOOKS.get(fullname)
        if after is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderAfter(spec.loader, after)
        return spec


def install() -> None:
    """Register now with the Auto modules already imported; hook the ones not imported yet. Idempotent."""
    pending = False
    for module, fn in _HOOKS.items():
        if module in sys.modules:
            _run(fn)
        else:
            pending = True
    if pending and not any(isinstance(f, _AutoClassHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoClassHook())


def __getattr__(name: str):
    if name == "MEAConfig":
        from .models.configuration_mea import MEAConfig

        return MEAConfig
    if name == "MEAForCausalLM":
        from .models.modeling_mea import MEAForCausalLM

        return MEAForCausalLM
    raise AttributeError(f"module 'mea.hf' has no attribute {name!r}")
