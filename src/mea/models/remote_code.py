"""The remote code of a saved Hugging Face folder: what ``trust_remote_code=True`` needs where mea is
not installed.

:func:`write_remote_code` (called by ``MEAForCausalLM.save_pretrained``) copies
``configuration_mea.py`` and ``modeling_mea.py`` into the folder and writes ``mea_snapshot.py``:
mea's modeling sources (:func:`snapshot_sources`, found by following relative imports from the
modules in :data:`SNAPSHOT_EXPORTS`) and a small import hook that serves them as a private package.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

# What the saved modeling code imports from mea; mea_snapshot.py exports the same names.
SNAPSHOT_EXPORTS = {
    "ModelConfig": "models.config",
    "Transformer": "models.transformer",
    "padding_mask": "models.transformer",
    "AttnInputs": "layers.attention",
}


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def snapshot_sources() -> dict[str, str]:
    """The source files of mea that the modeling code needs, keyed by path inside the package.

    Starts from the modules named in :data:`SNAPSHOT_EXPORTS` and follows every relative import
    (those inside functions and ``try`` blocks too), so optional fast paths travel along.
    """
    root = _package_root()
    todo = [root / (m.replace(".", "/") + ".py") for m in set(SNAPSHOT_EXPORTS.values())]
    sources: dict[str, str] = {}
    while todo:
        f = todo.pop()
        rel = f.relative_to(root).as_posix()
        if rel in sources:
            continue
        src = f.read_text(encoding="utf-8")
        sources[rel] = src
        for node in ast.walk(ast.parse(src, filename=str(f))):
            if isinstance(node, ast.Import) and any(a.name == "mea" or a.name.startswith("mea.") for a in node.names):
                raise ValueError(f"{rel}: imports mea by absolute name; the saved snapshot needs relative imports")
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if node.module and (node.module == "mea" or node.module.startswith("mea.")):
                    raise ValueError(f"{rel}: `from {node.module} import ...` by absolute name; the saved snapshot "
                                     "needs relative imports")
                continue
            base = f.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")) if node.module else base
            for cand in [target.with_suffix(".py"), target / "__init__.py"] + [target / f"{a.name}.py" for a in node.names]:
                if cand.is_file() and root in cand.resolve().parents:
                    todo.append(cand.resolve())
    return dict(sorted(sources.items()))


_SNAPSHOT_TEMPLATE = '''"""A snapshot of the modeling code of mea {version}, written by save_pretrained.

It lets this folder load with ``trust_remote_code=True`` where mea is not installed: the sources
below are imported as the private package ``{package}`` (an import hook serves them from this
file). Where mea is installed, configuration_mea.py and modeling_mea.py use the installed library
instead. Generated file: do not edit.
"""
import importlib
import importlib.abc
import importlib.util
import linecache
import sys

MEA_VERSION = {version!r}
PACKAGE = {package!r}
SOURCES = {sources}


class _SnapshotImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    package = PACKAGE

    def _file(self, fullname):
        if fullname == PACKAGE:
            return "__init__.py", True
        if not fullname.startswith(PACKAGE + "."):
            return None, False
        key = fullname[len(PACKAGE) + 1:].replace(".", "/")
        if key + ".py" in SOURCES:
            return key + ".py", False
        if any(k.startswith(key + "/") for k in SOURCES):
            return key + "/__init__.py", True
        return None, False

    def find_spec(self, fullname, path=None, target=None):
        name, is_package = self._file(fullname)
        if name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=name, is_package=is_package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name, _ = self._file(module.__name__)
        src = SOURCES.get(name, "")
        filename = "<mea " + MEA_VERSION + " snapshot>/" + name
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        exec(compile(src, filename, "exec"), module.__dict__)


if not any(getattr(f, "package", None) == PACKAGE for f in sys.meta_path):
    sys.meta_path.append(_SnapshotImporter())


def _get(module, name):
    return getattr(importlib.import_module(PACKAGE + "." + module), name)


{exports}
'''


def snapshot_module_source() -> str:
    """The text of ``mea_snapshot.py``: mea's modeling sources and a small import hook that serves them."""
    from .._version import __version__

    sources = snapshot_sources()
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:12]
    body = "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in sources.items()) + "}"
    exports = "\n".join(f"{name} = _get({mod!r}, {name!r})" for name, mod in SNAPSHOT_EXPORTS.items())
    return _SNAPSHOT_TEMPLATE.format(version=__version__, package=f"_mea_snapshot_{digest}", sources=body,
                                     exports=exports)


def write_remote_code(out_dir: PathLike) -> None:
    """Write configuration_mea.py, modeling_mea.py and mea_snapshot.py into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in ("configuration_mea.py", "modeling_mea.py"):
        shutil.copyfile(here / name, out / name)
    (out / "mea_snapshot.py").write_text(snapshot_module_source(), encoding="utf-8")
