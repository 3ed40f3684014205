"""The one door to HTCondor's ClassAd library (the ``htcondor`` wheel from PyPI).

Current wheels ship the module as ``classad2``; older ones (up to 23.x) as ``classad``
with the same calls used here. The wheel is an extra, ``pip install jobcage[condor]``:
only the HTCondor integration needs it, so :func:`module` imports it on first use and
says how to install it when neither name is importable.

Both libraries skip a malformed ad silently when parsing a sequence (``parseAds`` of
``"[a=1] [b="`` yields one ad and no error), and a transfer list or a job ad that lost
an attribute that way must not pass for a good one. So :func:`parse_ads` cuts the text
into one piece per ad itself and has the library parse each piece with the
``ClassAd(text)`` constructor, which does raise. Old-format ads (``Name = expr`` lines,
ads separated by blank lines, what HTCondor writes to ``.job.ad``) are rewritten into
the bracketed form first: the expression syntax is the same.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

from .errors import ClassAdError, MissingExtraError

MODULE_NAMES = ("classad2", "classad")

ClassAd = Any  # the library's ClassAd; typed loosely since the library is optional


@functools.cache
def module() -> ModuleType:
    """The ClassAd module of the installed htcondor wheel (classad2, else classad)."""
    for name in MODULE_NAMES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingExtraError(
        "HTCondor's ClassAd library is not installed (neither classad2 nor classad "
        "imports): install the extra with `pip install jobcage[condor]` "
        "(or `pip install htcondor`) into the environment jobcage runs from"
    )


def new_ad(attributes: Mapping[str, Any] | None = None) -> ClassAd:
    """A ClassAd holding ``attributes`` as literals: bool, int, float, str, and lists
    and mappings (nested ads) of those."""
    ad = module().ClassAd()
    for name, value in (attributes or {}).items():
        ad[name] = _literal(name, value)
    return ad


def _literal(name: str, value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return new_ad(value)
    if isinstance(value, list | tuple):
        return [_literal(name, item) for item in value]
    raise ClassAdError(
        f"attribute {name!r}: {type(value).__name__} {value!r} is not a ClassAd literal; "
        "give a bool, int, float, str, or a list or mapping of those"
    )


def parse_ad(text: str) -> ClassAd:
    """Exactly one ad, new (``[ a = 1 ]``) or old (``a = 1`` lines) format."""
    ads = parse_ads(text)
    if len(ads) != 1:
        raise ClassAdError(f"expected exactly one ClassAd, found {len(ads)}")
    return ads[0]


def parse_ads(text: str) -> list[ClassAd]:
    """Every ad in ``text``; any malformed one raises :class:`ClassAdError`."""
    pieces = _new_format_pieces(text) if _first_token(text) == "[" else _old_format_pieces(text)
    lib = module()
    ads = []
    for number, piece in enumerate(pieces, 1):
        try:
            ads.append(lib.ClassAd(piece))
        except Exception as e:  # ClassAdParseError (classad) / ClassAdException (classad2)
            raise ClassAdError(f"ClassAd number {number} does not parse: {_excerpt(piece)}") from e
    return ads


def read_ads(path: str) -> list[ClassAd]:
    """Every ad of the file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ClassAdError(f"cannot read ClassAds from {path}: {e}") from None
    return parse_ads(text)


def evaluate(ad: ClassAd, name: str, default: Any = None) -> Any:
    """``name`` evaluated in ``ad`` as a Python value (bool, int, float, str, list, ad).

    A missing or undefined attribute gives ``default``; an expression that evaluates
    to ERROR raises, since a silent default would hide a broken ad.
    """
    lib = module()
    try:
        value = ad.eval(name)
    except KeyError:
        return default
    except Exception as e:
        raise ClassAdError(f"attribute {name} does not evaluate: {e}") from e
    if not isinstance(value, lib.Value):  # Value is an int enum: 1 == Value.Error
        return value
    if value is lib.Value.Undefined:  # `is`: classad (v1) turns == into an expression
        return default
    if value is lib.Value.Error:
        raise ClassAdError(f"attribute {name} = {ad.get(name)} evaluates to ERROR")
    return value


def print_ad(ad: ClassAd, *, old: bool = False) -> str:
    """The ad as text, newline-terminated: the new (bracketed) format by default.

    New format because a string holding a newline stays on one line there
    (``printOld`` writes it raw, which breaks the line-based old format); ``old=True``
    for readers that want ``Name = value`` lines, and only for such plain values.
    """
    if old:
        return ad.printOld().rstrip("\n") + "\n"
    return str(ad).strip() + "\n"


def print_ads(ads: Iterable[ClassAd]) -> str:
    return "".join(print_ad(ad) for ad in ads)


# -- cutting text into one piece per ad ---------------------------------------------------


def _first_token(text: str) -> str:
    stripped = _skip_space_and_comments(text, 0)
    return text[stripped] if stripped < len(text) else ""


def _skip_space_and_comments(text: str, i: int) -> int:
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ClassAdError(f"unterminated /* comment at offset {i}")
            i = end + 2
        else:
            break
    return i


def _new_format_pieces(text: str) -> list[str]:
    """Top-level ``[ ... ]`` groups; string literals, quoted names and comments skipped."""
    pieces: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        if depth == 0:
            i = _skip_space_and_comments(text, i)
            if i == len(text):
                break
            if text[i] != "[":
                raise ClassAdError(f"text outside any ClassAd at offset {i}: {_excerpt(text[i:])}")
            start = i
        ch = text[i]
        if ch in "\"'":
            i = _end_of_quoted(text, i)
            continue
        if text.startswith(("//", "/*"), i):
            i = _skip_space_and_comments(text, i)
            continue
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth == 0:
                pieces.append(text[start : i + 1])
        i += 1
    if depth:
        raise ClassAdError(f"unterminated ClassAd at offset {start}: {_excerpt(text[start:])}")
    return pieces


def _end_of_quoted(text: str, i: int) -> int:
    quote = text[i]
    j = i + 1
    while j < len(text) and text[j] != quote:
        j += 2 if text[j] == "\\" else 1
    if j >= len(text):
        raise ClassAdError(f"unterminated quoted text at offset {i}: {_excerpt(text[i:])}")
    return j + 1


def _old_format_pieces(text: str) -> list[str]:
    """Blank-line separated blocks of ``Name = expr`` lines, each made one bracketed ad."""
    pieces = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if stripped:
            block.append(stripped)
        elif block:
            pieces.append("[\n" + ";\n".join(block) + "\n]")
            block = []
    return pieces


def _excerpt(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")
