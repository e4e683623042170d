"""Where things run and write: devices, output folders, atomic files.

Every command asks this module for its device and for leave to write its output, so that one rule and
one message hold for all of them:

- :func:`resolve_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (``mps`` where there is one) checked
  against this machine, or a ``ValueError`` naming the option.
- :func:`output_folder` / :func:`output_file`: a target that does not exist, an empty folder, or a
  folder the command recognizes as its own earlier output (``own``) may be written; anything else
  is refused unless ``--overwrite true``, which replaces it. Nothing is written by the check itself.
- :func:`replace_folder`, :func:`empty_folder`, :func:`atomic_write_text`: writes that a kill leaves
  either done or not done.
- :func:`option_names`: a ``ValueError`` raised as ``field: problem`` by a config class, renamed to
  the option that carries the field on the command line (``model.n_heads``).

Errors say ``<field>: <problem>`` in one line; the command line prints them as
``mea: error: <field>: <problem>`` and exits with status 2. This module imports nothing from mea.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
OVERWRITE_HINT = "choose another, or pass --overwrite true to replace it"


# ---------------------------------------------------------------------------------------- devices
def resolve_device(field: str, value: str, index: bool = True) -> str:
    """The device ``value`` names on this machine: ``auto`` is ``cuda`` where CUDA is available, else
    ``cpu``; ``cuda``/``cuda:N`` must exist here. ``index=False``: the command picks its GPU itself
    (one per process under torchrun), so ``cuda:N`` is refused.

    Raises:
        ValueError: ``field: ...`` for a device this machine lacks or a name that is no device.
    """
    import torch

    v = str(value).strip().lower()
    if v == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if v == "cpu":
        return v
    if v == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{field}: {value!r} asked for, but this machine has no MPS device (use cpu or auto)")
        return v
    kind, colon, num = v.partition(":")
    if kind != "cuda":
        raise ValueError(f"{field}: unknown device {value!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{field}: {value!r} asked for, but CUDA is not available on this machine (use cpu or auto)")
    if colon:
        n = torch.cuda.device_count()
        if not index:
            raise ValueError(f"{field}: {value!r}: this command takes cuda without an index (one GPU per process; "
                             "choose GPUs with CUDA_VISIBLE_DEVICES or torchrun)")
        if not num.isdigit() or int(num) >= n:
            raise ValueError(f"{field}: {value!r}: this machine has {n} GPU{'s' if n != 1 else ''} "
                             f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    return v


def check_gpus(field: str, gpus: Optional[list[int]]) -> None:
    """GPU indices (``--gpus '[0, 1]'``) that this machine has. Without CUDA they are only slots for
    processes, which then run on the CPU (how the tests run a multi-GPU sweep), so any index >= 0 does."""
    if not gpus:
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else None
    bad = [g for g in gpus if isinstance(g, bool) or not isinstance(g, int) or g < 0 or (n is not None and g >= n)]
    if bad:
        raise ValueError(f"{field}: {bad[0]!r} is not a GPU of this machine, which has "
                         + (f"{n} (0 to {n - 1})" if n else "none"))


# ---------------------------------------------------------------------------------------- outputs
def holding(*names: str) -> Callable[[Path], bool]:
    """``own`` predicate: the folder holds one of these entries (a file a command always writes)."""
    return lambda p: any((p / n).exists() for n in names)


def holding_only(*patterns: str) -> Callable[[Path], bool]:
    """``own`` predicate: every entry of the folder matches one of these glob patterns (the names a
    command writes), so that a folder with anything else in it is not taken for the command's."""
    return lambda p: all(any(fnmatch.fnmatchcase(e.name, pat) for pat in patterns) for e in p.iterdir())


def output_folder(field: str, path: PathLike, command: str, overwrite: bool = False,
                  own: Optional[Callable[[Path], bool]] = None) -> Path:
    """Check that ``mea COMMAND`` may write the folder ``path`` (given as option ``field``); returns it.

    Allowed: a path that does not exist, an empty folder, a folder ``own`` recognizes as the
    command's earlier output (the command then continues or replaces it as it documents), or anything
    with ``overwrite`` (the command then replaces it). Nothing is created or changed here.

    Raises:
        FileExistsError: ``field: PATH is not empty and mea COMMAND did not write it; ...``, or a file
            where a folder is asked for.
    """
    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        return p
    if not p.is_dir():
        if overwrite:
            return p
        raise FileExistsError(f"{field}: {p} is a file, and mea {command} writes a folder there; {OVERWRITE_HINT}")
    if overwrite or not any(p.iterdir()) or (own is not None and own(p)):
        return p
    raise FileExistsError(f"{field}: {p} is not empty and mea {command} did not write it; {OVERWRITE_HINT}")


def output_file(field: str, path: PathLike, command: str, overwrite: bool = False) -> Path:
    """Check that ``mea COMMAND`` may write the file ``path`` (option ``field``): it does not exist, or
    ``overwrite``; its folder may be created. Returns it.

    Raises:
        FileExistsError: the file exists (without ``overwrite``), or it is a folder.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise FileExistsError(f"{field}: {p} is a folder; mea {command} writes a file there")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{field}: {p} already exists; {OVERWRITE_HINT}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{field}: {parent} is a file, so {p} cannot be written")
            break
    return p


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_path(value: PathLike) -> Path:
    """A config file named on the command line or in another config: the file as given where it exists,
    else the one shipped with mea under that name (``small``, ``small.yaml``, ``configs/small.yaml``,
    ``study/scratch/declared.yaml``), so that the shipped configs work from any directory; else the path
    as given (its reader says that it is missing)."""
    p = Path(value).expanduser()
    if p.exists():
        return p
    name = str(value)[len("configs/"):] if str(value).startswith("configs/") else str(value)
    for cand in (SHIPPED_CONFIGS / name, SHIPPED_CONFIGS / f"{name}.yaml"):
        if cand.is_file():
            return cand
    return p


def empty_folder(path: PathLike) -> Path:
    """Make ``path`` an empty folder (what ``--overwrite true`` asks of a command that writes its folder
    as it goes): what was there is moved aside in one rename, then deleted."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        old = p.with_name(f".{p.name}.old-{os.getpid()}")
        os.replace(p, old)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    p.mkdir(parents=True)
    return p


def temp_folder(dest: PathLike) -> Path:
    """A fresh, empty sibling of ``dest`` to write into before :func:`replace_folder` moves it there."""
    d = Path(dest)
    tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_folder(tmp: PathLike, dest: PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``dest``, replacing what was there: a kill at any moment
    leaves either the old ``dest`` or the new one (the old one is renamed aside, then deleted)."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return dest


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it, flushed to disk first."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- messages
_FIELD = re.compile(r"^([A-Za-z_][\w.]*(?:\[\d+\])?): ")


@contextlib.contextmanager
def option_names(prefix: str, keep: tuple[str, ...] = ()) -> Iterator[None]:
    """Inside, a ``ValueError`` that says ``field: problem`` (as config classes do) is raised again as
    ``PREFIX.field: problem``, the option that carries the field on the command line; fields in
    ``keep`` are options of their own (``--n_kv_heads``) and stay as they are."""
    try:
        yield
    except ValueError as e:
        m = _FIELD.match(str(e))
        if m is None or m.group(1).split("[")[0] in keep or m.group(1).startswith(prefix + "."):
            raise
        raise ValueError(f"{prefix}.{e}") from e


@contextlib.contextmanager
def about(field: str, aka: tuple[str, ...] = ("model", "corpus")) -> Iterator[None]:
    """Inside, an error of reading what the option ``field`` names (a model, a run, a corpus: missing,
    damaged, of the wrong kind) is raised again, of the same type, as ``field: ...``. A message that
    starts with a generic name in ``aka`` (``model: ...``, as loaders say it) gets ``field`` instead."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        msg = str(e)
        if msg.startswith(f"{field}: "):
            raise
        generic = next((a for a in aka if msg.startswith(f"{a}: ")), None)
        msg = f"{field}: {msg[len(generic) + 2:] if generic else msg}"
        try:
            again = type(e)(msg)
        except TypeError:  # an exception type that takes other arguments
            again = ValueError(msg)
        raise again from e


def one_line(message: str) -> str:
    """A message on one line (an error from a library may span several)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
