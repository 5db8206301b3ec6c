"""Math answers: the file formats of the math data sets, final-answer extraction, answer normalisation.

Where each format keeps the final answer of a worked solution:

| format     | columns                | final answer                                   |
|------------|------------------------|------------------------------------------------|
| MetaMathQA | ``query``, ``response``  | a last line ``The answer is: N``               |
| GSM8K      | ``question``, ``answer`` | a last line ``#### N``                         |
| MATH       | ``problem``, ``solution``| the last ``\\boxed{...}`` (nested braces)     |

``extract_answer`` reads any of the three (the marker that comes last wins), so one function scores the
generations of a model tuned on any of them. ``normalize_answer`` is the comparison key of ``exact_match``:
numbers compare by value (``1,000`` = ``1000.00`` = ``+1000``, ``3/4`` = ``0.75`` = ``\\frac{3}{4}``) and
other answers as tidied strings (see its docstring for the exact list; it is deliberately modest).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

ANSWER_PREFIX = "The answer is: "  # MetaMathQA
GSM8K_PREFIX = "#### "
_META_MARKER = re.compile(r"the answer is:?", re.IGNORECASE)
_GSM_MARKER = re.compile(r"####")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # 1,000 / 12,345.5


# -- extraction --------------------------------------------------------------------------------------------------
def _tidy(answer: str) -> str:
    """Readable form: no surrounding space, trailing period or ``$``; ``1,250`` -> ``1250``; ``2.50`` -> ``2.5``."""
    answer = re.sub(r"\\?\$", "", answer).strip().rstrip(".").strip()  # $ and \$
    if _GROUPED.fullmatch(answer):  # only a whole number: "(1,234)" stays a pair
        answer = answer.replace(",", "")
    if _NUMBER.fullmatch(answer) and "." in answer:
        answer = answer.rstrip("0").rstrip(".")
    return answer


def _after_last(marker: re.Pattern, text: str) -> tuple[int, str] | None:
    """(position, rest of the line) after the last match of ``marker``."""
    found = list(marker.finditer(text))
    if not found:
        return None
    return found[-1].start(), text[found[-1].end():].split("\n", 1)[0]


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces close."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return match.start(), text[start:i]
    return None


def _extractor(*finders: Callable[[str], tuple[int, str] | None]) -> Callable[[str | None], str | None]:
    def extract(text: str | None) -> str | None:
        found = [f(text) for f in finders] if text else []
        found = [f for f in found if f is not None]
        return (_tidy(max(found)[1]) or None) if found else None

    return extract


def _marked(marker: re.Pattern) -> Callable[[str], tuple[int, str] | None]:
    return lambda text: _after_last(marker, text)


_extract_marked = _extractor(_marked(_META_MARKER), _marked(_GSM_MARKER), _last_boxed)


def extract_answer(text: str | None) -> str | None:
    """The final answer in ``text``: after the last ``The answer is:`` or ``####``, or in the last ``\\boxed{}``
    (whichever comes last); else ``text`` itself when it is a single number (see ``parse_number``).

    Commas in numbers, ``$`` and a trailing period are removed (``"#### $1,000."`` -> ``"1000"``).
    Returns ``None`` when there is no answer marker and the text is not a single number.
    """
    answer = _extract_marked(text)
    if answer is not None or not text:
        return answer
    bare = _tidy(text)
    return bare if parse_number(bare) is not None else None


@dataclass(frozen=True)
class MathFormat:
    """A math data set's file layout: its question and worked-solution columns and where the answer sits."""

    name: str
    question: str  # column of the problem
    solution: str  # column of the worked solution that ends with (or holds) the final answer
    answer_form: str  # where the answer is, for error messages
    extract: Callable[[str | None], str | None]  # the final answer of one solution, or None


MATH_FORMATS: tuple[MathFormat, ...] = (
    MathFormat("MetaMathQA", "query", "response", "a last line 'The answer is: N'", _extractor(_marked(_META_MARKER))),
    MathFormat("GSM8K", "question", "answer", "a last line '#### N'", _extractor(_marked(_GSM_MARKER))),
    MathFormat("MATH", "problem", "solution", "a '\\boxed{...}' answer", _extractor(_last_boxed)),
)


# -- normalisation -----------------------------------------------------------------------------------------------
_LATEX_TIDY = (  # (pattern, replacement), applied in order
    (r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1"),  # \text{cm} -> cm
    (r"\\left|\\right", ""),  # \left( -> (
    (r"\\[!,;: ]|~", ""),  # thin spaces and ties
    (r"\\[dt]frac", r"\\frac"),
    (r"\\frac(\d)(\d)", r"\\frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
    (r"\\sqrt(\d)", r"\\sqrt{\1}"),  # \sqrt2 -> \sqrt{2}
    (r"\^\{?\\circ\}?", ""),  # degrees
    (r"\\?%", ""),  # percent signs
    (r"\{,\}", ","),  # 1{,}000
    (r"\\?\$", ""),  # $ and \$
    (r"\s+", ""),
)
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_RATIO = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRAC = re.compile(r"([+-]?)\\frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))")


def parse_number(text: str) -> Fraction | None:
    """The exact value of a plain number: ``1,000``, ``+5``, ``18.00``, ``.5``, ``3/4``, ``\\frac{3}{4}``, ``\\frac34``.

    Returns ``None`` for anything else (expressions, intervals, words, ``1e3``).
    """
    text = text.strip()
    if _GROUPED.fullmatch(text):
        text = text.replace(",", "")
    if _DECIMAL.fullmatch(text):
        return Fraction(text)
    if ratio := _RATIO.fullmatch(text):
        num, den = int(ratio[1]), int(ratio[2])
    elif frac := _LATEX_FRAC.fullmatch(text):
        sign, num, den = frac[1], frac[2] or frac[4], frac[3] or frac[5]
        num, den = int(num) * (-1 if sign == "-" else 1), int(den)
    else:
        return None
    return Fraction(num, den) if den else None


def normalize_answer(answer: str) -> str:
    """The comparison key of a final answer (what ``exact_match`` compares).

    1. LaTeX tidying (for MATH answers): ``\\text{..}``/``\\mbox{..}`` unwrapped, ``\\left``/``\\right``, the
       spaces ``\\! \\, \\; \\:`` and ``~``, degree signs ``^\\circ``, percent signs and ``$`` removed;
       ``\\dfrac``/``\\tfrac`` read as ``\\frac``, ``\\frac12`` as ``\\frac{1}{2}``, ``\\sqrt2`` as ``\\sqrt{2}``;
       ``1{,}000`` as ``1,000``; all whitespace removed; a trailing period dropped.
    2. A plain number (see ``parse_number``) becomes its exact value: ``1,000.00``, ``+1000`` and ``1000`` all
       give ``1000``; ``0.75``, ``3/4`` and ``\\frac{3}{4}`` all give ``3/4``.
    3. Anything else is compared case-insensitively as the tidied string: ``\\left( 1, 2 \\right)`` equals
       ``(1,2)``, but ``\\sqrt{2}/2`` does not equal ``\\frac{\\sqrt{2}}{2}`` (no symbolic algebra).
    """
    text = answer
    for pattern, replacement in _LATEX_TIDY:
        text = re.sub(pattern, replacement, text)
    text = text.rstrip(".")
    value = parse_number(text)
    if value is None:
        return text.casefold()
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
