"""Text cleaning shared by the source recipes: markup stripping, whitespace, English filters, dedup keys."""
from __future__ import annotations

import hashlib
import html as _html
import re
import unicodedata
from typing import Iterable, Iterator

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """NFC-normalize, unify newlines, turn every run of spaces/tabs into one space, strip each line,
    and keep at most one blank line between paragraphs (single newlines stay: verse needs them)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _ZERO_WIDTH.sub("", text))
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def reflow(text: str) -> str:
    """Join hard-wrapped lines inside each paragraph (paragraphs are separated by blank lines)."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paras if p.strip())


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Cut Project Gutenberg's licence header and footer, keeping only the work itself."""
    m = None
    for m in _GUTENBERG_START.finditer(text):
        pass  # the last start marker: old files repeat the small print before the text
    if m:
        text = text[m.end():]
    e = _GUTENBERG_END.search(text)
    if e:
        text = text[:e.start()]
    return text


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def detokenize(text: str) -> str:
    """Undo Penn/Brown-style tokenization: quotes, spaces before punctuation, split clitics."""
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = re.sub(r"(?<=\w) (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r'"\s+([^"]*?)\s+"', r'"\1"', text)
    return re.sub(r"([;,])(?:\s*\1)+", r"\1", text)  # the Brown files double some semicolons


def strip_brown_tags(text: str) -> str:
    """Turn a POS-tagged Brown corpus file (``The/at jury/nn ./.``) into plain text, one paragraph per
    tab-indented block."""
    paras = []
    for block in re.split(r"\n\s*\n", text):
        words = [m.group(1) for m in _BROWN_TOKEN.finditer(block)]
        if words:
            paras.append(detokenize(" ".join(words)))
    return "\n\n".join(paras)


_OSIS_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
_OSIS_BREAK = re.compile(r"<(?:title|/title|lb|l|/l|p|/p|div|/div|chapter|lg|/lg|milestone)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")


def strip_osis(text: str) -> str:
    """Plain text from a SWORD module entry in OSIS/ThML markup: footnotes dropped, titles and
    paragraph milestones become line breaks, every other tag is removed."""
    text = _OSIS_NOTE.sub(" ", text)  # a footnote sits between words without spaces around it
    text = _OSIS_BREAK.sub("\n", text)
    text = _html.unescape(_TAG.sub("", text))
    text = re.sub(r"[ \t]+([,.;:!?])", r"\1", text)
    return text


def html_paragraphs(html: str | bytes, root_xpath: str = "//body",
                    drop: Iterable[str] = ("script", "style", "nav", "header", "footer", "pre", "table",
                                           "form", "noscript", "svg", "math")) -> list[str]:
    """The prose paragraphs of an HTML page: the text of each ``p``, ``li``, ``dd``, ``blockquote`` and
    heading under the first element matching `root_xpath`, after removing the `drop` elements (code
    blocks, tables, navigation). Needs lxml."""
    import lxml.html

    doc = lxml.html.fromstring(html)
    roots = doc.xpath(root_xpath) or doc.xpath("//body") or [doc]
    root = roots[0]
    for el in root.xpath(" | ".join(f".//{t}" for t in drop)):
        el.drop_tree()
    for el in root.xpath(".//*[contains(concat(' ', normalize-space(@class), ' '), ' highlight ')"
                         " or contains(concat(' ', normalize-space(@class), ' '), ' headerlink ')"
                         " or contains(concat(' ', normalize-space(@class), ' '), ' navheader ')"
                         " or contains(concat(' ', normalize-space(@class), ' '), ' navfooter ')]"):
        el.drop_tree()
    out = []
    blocks = ("p", "li", "dd", "dt", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6")
    for el in root.iter(*blocks, "div"):
        # DocBook (Publican) pages put paragraphs in <div class="para"> rather than <p>.
        is_para = el.tag != "div" or "para" in (el.get("class") or "").split()
        if not is_para:
            continue
        # A list item, quote or paragraph div holding paragraphs is read through those instead.
        if el.tag in ("li", "dd", "blockquote", "div") and el.xpath(".//p | .//div[contains(@class, 'para')]"):
            continue
        text = " ".join(el.text_content().split())
        if text:
            out.append(text)
    return out


_STOPWORDS = frozenset("the of and to a in is that it for as with was on be by this are or from at an which "
                       "not have you can if but all one their they has its will his he we there".split())


def is_english_prose(paragraph: str, min_words: int = 8, min_stopword_ratio: float = 0.12,
                     min_alpha_ratio: float = 0.7) -> bool:
    """A cheap test that a paragraph is English running text rather than code, a table row, a
    command listing or another language: enough words, mostly letters, enough common English
    function words, and a sentence-like end."""
    words = paragraph.split()
    if len(words) < min_words:
        return False
    letters = sum(c.isalpha() for c in paragraph)
    if letters / max(1, len(paragraph.replace(" ", ""))) < min_alpha_ratio:
        return False
    stop = sum(w.strip(".,;:!?()\"'").lower() in _STOPWORDS for w in words)
    if stop / len(words) < min_stopword_ratio:
        return False
    return paragraph.rstrip()[-1:] in '.!?:;)"\'”’'


def english_paragraphs(paragraphs: Iterable[str], **kw) -> list[str]:
    return [p for p in paragraphs if is_english_prose(p, **kw)]


def doc_key(text: str) -> str:
    """The exact-dedup key of a document: a hash of its case-folded, whitespace-collapsed text."""
    return hashlib.sha1(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


def split_long(text: str, max_chars: int) -> Iterator[str]:
    """Cut a long document at paragraph boundaries (or, inside an overlong paragraph, at sentence
    ends) into parts of at most about `max_chars` characters."""
    if len(text) <= max_chars:
        yield text
        return
    pieces: list[tuple[str, str]] = []  # (text, separator that followed it in the original)
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            pieces.append((para, "\n\n"))
        else:
            pieces.extend((s, " ") for s in re.split(r"(?<=[.!?])\s+", para))
            pieces[-1] = (pieces[-1][0], "\n\n")
    part, size = [], 0
    for piece, sep in pieces:
        if size + len(piece) > max_chars and part:
            yield "".join(part).strip()
            part, size = [], 0
        part.append(piece + sep)
        size += len(piece) + len(sep)
    if part:
        yield "".join(part).strip()
