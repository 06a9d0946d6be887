"""Full-text search, the engine-independent half: what is indexed, how a query is read, and the snippets.

Both engines index the same words, produced here: text is folded (Unicode compatibility decomposition, accents
dropped, case folded: "Crème Brûlée" and "creme brulee" are the same words) and cut into runs of letters and digits.
SQLite's FTS5 and PostgreSQL's ``to_tsvector('simple', ...)`` then only split on the spaces between them, so a word
matches on one engine exactly when it matches on the other. What is indexed is the readable text of the subject and
of every message (``content``, never the HTML): a word that exists only in markup cannot match.

A query is read the same way: whatever a user types (quotes, ``*``, ``AND(``, unbalanced parentheses) is text, and
becomes the list of its words; a conversation matches when it has all of them (each engine writes them in its own
query syntax: ``SqlFlavor.search_query``). Snippets are cut here, from the
stored text, with the matched words marked: the engines' own snippet functions would show the folded text.
"""

from __future__ import annotations

import functools
import html
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kbms.model import Conversation

WORD = re.compile(r"[^\W_]+")
MAX_TERMS = 16
# A search ranks the WINDOW most recently created conversations that match (all of them when fewer match): the
# cost of a search then stays flat however many conversations a common word matches. Its pages end there.
WINDOW = 1000
SNIPPET_WORDS = 24  # words of context around the first match
MARK_START, MARK_END = "<mark>", "</mark>"


def fold(text: str) -> str:
    """Accents dropped and case folded: the same as folding character by character (``folded_with_positions``).

    Done on runs of characters, because it runs over every message of every conversation written: character by
    character it cost about 0.5 ms per conversation of the benchmark corpus (profiled). Equal because NFKD
    decomposes each character alone and only reorders combining marks, which are all dropped; and case folding
    maps each character alone (for ASCII, ``lower`` is ``casefold``). So ASCII runs are lowered, and the runs
    between them, mostly single accented letters and punctuation, are folded once and remembered.
    """
    if text.isascii():
        return text.lower()
    pieces = _NON_ASCII.split(text)  # ASCII runs at even positions, the runs between them at odd ones
    for index in range(0, len(pieces), 2):
        pieces[index] = pieces[index].lower()
    for index in range(1, len(pieces), 2):
        run = pieces[index]
        pieces[index] = _fold_short(run) if len(run) <= SHORT_RUN else _fold_run(run)
    return "".join(pieces)


_NON_ASCII = re.compile(r"([^\x00-\x7f]+)")
SHORT_RUN = 16  # runs up to this long are remembered (a bounded number of bounded strings)


def _fold_run(run: str) -> str:
    return unicodedata.normalize("NFKD", run).translate(_combining_marks()).casefold()


_fold_short = functools.lru_cache(maxsize=4096)(_fold_run)


@functools.cache
def _combining_marks() -> dict[int, None]:
    """A ``str.translate`` table that drops every combining mark (built on first use, about 0.1 s)."""
    return {code: None for code in range(sys.maxunicode + 1) if unicodedata.combining(chr(code))}


def _fold_char(ch: str) -> str:
    return ch.lower() if ch.isascii() else _fold_short(ch)


# For ASCII text, WORD's runs are runs of letters and digits: every other byte becomes a space, and str.split finds
# them (a C-level pass: the regex took about 40 us per conversation of the benchmark corpus).
_ASCII_SEPARATORS = bytes(c if chr(c).isascii() and chr(c).isalnum() else 0x20 for c in range(256))


def words(text: str) -> list[str]:
    """The folded words of ``text``: the runs of letters and digits (``WORD``) of ``fold(text)``."""
    folded = fold(text)
    if folded.isascii():
        return folded.encode("ascii").translate(_ASCII_SEPARATORS).decode("ascii").split()
    return WORD.findall(folded)


def document(conversation: Conversation) -> str:
    """The indexed text of a conversation: the words of its subject and messages, separated by spaces."""
    parts: list[str] = [conversation.subject or ""]
    parts += (message.content for message in conversation.messages)
    return " ".join(" ".join(words(part)) for part in parts if part)


def query_terms(q: str) -> list[str]:
    """The words of a query, without repeats, at most ``MAX_TERMS``; empty if it has none."""
    return list(dict.fromkeys(words(q)))[:MAX_TERMS]


@dataclass(frozen=True, slots=True)
class Snippet:
    text: str  # HTML-escaped, with the matched words in <mark></mark>
    message_id: str | None  # the message it comes from; None for the subject


def snippet(subject: str | None, messages: Iterable[tuple[str, str]], terms: Sequence[str]) -> Snippet | None:
    """The first passage (subject first, then messages in order) that holds a term, with every term marked."""
    wanted = set(terms)
    for message_id, text in [(None, subject or ""), *messages]:
        folded, positions = folded_with_positions(text)
        spans = [
            (positions[m.start()], positions[m.end() - 1] + 1) for m in WORD.finditer(folded) if m.group() in wanted
        ]
        if spans:
            return Snippet(_cut(text, spans), message_id)
    return None


def folded_with_positions(text: str) -> tuple[str, list[int]]:
    """The folded text, and for each of its characters the index of the original character it came from."""
    out: list[str] = []
    positions: list[int] = []
    for index, ch in enumerate(text):
        piece = _fold_char(ch)
        out.append(piece)
        positions.extend([index] * len(piece))
    return "".join(out), positions


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """A window of words around the first match, HTML-escaped, matches marked."""
    bounds = [m.span() for m in re.finditer(r"\S+", text)]
    first = next(i for i, (start, end) in enumerate(bounds) if end > spans[0][0])
    lo = max(0, first - SNIPPET_WORDS // 3)
    hi = min(len(bounds), lo + SNIPPET_WORDS)
    start, end = bounds[lo][0], bounds[hi - 1][1]
    pieces: list[str] = ["…" if lo > 0 else ""]
    cursor = start
    for span_start, span_end in spans:
        if span_end <= start or span_start >= end:
            continue
        pieces.append(html.escape(text[cursor:span_start]))
        pieces.append(MARK_START + html.escape(text[span_start:span_end]) + MARK_END)
        cursor = span_end
    pieces.append(html.escape(text[cursor:end]))
    pieces.append("…" if hi < len(bounds) else "")
    return " ".join("".join(pieces).split())
