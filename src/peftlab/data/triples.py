"""WebNLG and DART (triples → text): readers for the JSON files of the LoRA / MTLoRA repositories.

Two formats, as shipped in the LoRA repository's ``examples/NLG/data`` (the user brings the files):

* WebNLG 2017 (``webnlg_challenge_2017/{train,dev,test}.json``): ``{"entries": [{"1": {"category": …,
  "modifiedtripleset": [{"subject", "property", "object"}, …], "lexicalisations": [{"lex", "comment"}, …]}},
  {"2": {…}}, …]}``. As the repository's ``src/format_converting_webnlg.py`` does, only lexicalisations
  whose ``comment`` is ``"good"`` are kept (a missing comment counts as good).
* DART (``dart/dart-v1.1.1-full-{train,dev,test}.json``): ``[{"tripleset": [[s, p, o], …],
  "annotations": [{"source", "text"}, …]}, …]``. As ``src/format_converting_dart.py`` does, the
  predicate is lower-cased.

Triples are linearised as the conversion scripts do: ``subject : predicate : object | subject : …``.
Rows have the E2E columns (``mr`` = the linearised triples, ``ref`` = one reference) and ``category`` (a WebNLG
entry's DBpedia category, ``""`` for DART), so ``group_references`` and ``split_by_mr`` keep every input with
all its references in one split, and WebNLG scores can be reported on the seen categories, the unseen ones and
all, as the LoRA and MTLoRA papers do (:data:`WEBNLG_SEEN_CATEGORIES`).
Entries without triples (no input) and empty references are skipped; a file with no input left is a DataError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets as hf

from .cache import DataError

_FEATURES = hf.Features({"mr": hf.Value("string"), "ref": hf.Value("string"), "category": hf.Value("string")})
# The 10 categories of WebNLG 2017's training data ("seen"); its test set adds 5 unseen ones (Athlete, Artist,
# CelestialBody, MeanOfTransportation, Politician). The list of the LoRA repository's format_converting_webnlg.py.
WEBNLG_SEEN_CATEGORIES = frozenset({"Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
                                    "SportsTeam", "University", "WrittenWork"})
WEBNLG_SHAPE = '{"entries": [{"1": {"modifiedtripleset": [{subject, property, object}], "lexicalisations": [{lex}]}}]}'
DART_SHAPE = '[{"tripleset": [[subject, predicate, object]], "annotations": [{source, text}]}]'


def linearise(triples: Iterable[Sequence[str]]) -> str:
    """``subject : predicate : object | …``, the LoRA repository's input layout for WebNLG and DART."""
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def triples_format(path: str | Path) -> str | None:
    """``"webnlg"`` (a JSON object), ``"dart"`` (a JSON array) or ``None`` (not JSON: an E2E file).

    Only the first character is looked at; the readers check the whole shape.
    """
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return {"{": "webnlg", "[": "dart"}.get(head[:1])


def _load_json(path: Path, kind: str, shape: str) -> Any:
    if not path.is_file():
        raise DataError(f"No such {kind} file: {path}.")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); a {kind} file looks like {shape}.") from None


def _dataset(path: Path, kind: str, rows: list[dict[str, str]], shape: str) -> hf.Dataset:
    if not rows:
        raise DataError(f"{path} holds no {kind} input with a triple and a reference; each entry needs both, "
                        f"as in {shape}.")
    return hf.Dataset.from_list(rows, features=_FEATURES)


def _read(path: str | Path, kind: str, shape: str, entries: Any, parse: Any) -> hf.Dataset:
    """Rows ``{mr, ref}`` of a triples file: ``entries(data)`` lists its entries (``None``: not this format),
    ``parse(entry)`` gives one entry's linearised input and references."""
    path = Path(path)
    items = entries(_load_json(path, kind, shape))
    if items is None:
        raise DataError(f"{path} is not a {kind} file: expected {shape}.")
    rows = []
    for i, entry in enumerate(items, 1):
        try:
            mr, refs, category = parse(entry)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path}: entry {i} is not a {kind} entry; expected {shape}.") from None
        if mr.strip():  # an entry without triples has no input to learn from
            rows += [{"mr": mr, "ref": str(ref).strip(), "category": str(category)} for ref in refs if str(ref).strip()]
    return _dataset(path, kind, rows, shape)


def _webnlg_entry(wrapper: dict[str, Any]) -> tuple[str, list[str], str]:
    (entry,) = wrapper.values()  # {"<id>": {...}}
    mr = linearise((t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"])
    refs = [lex["lex"] for lex in entry["lexicalisations"] if lex.get("comment", "good") == "good"]
    return mr, refs, entry.get("category") or ""


def _dart_entry(entry: dict[str, Any]) -> tuple[str, list[str], str]:
    mr = linearise((s, p.lower(), o) for s, p, o in entry["tripleset"])
    return mr, [a["text"] for a in entry["annotations"]], ""


def read_webnlg(path: str | Path) -> hf.Dataset:
    """WebNLG 2017 JSON (the LoRA repository's layout) → ``Dataset`` with ``mr``, ``ref`` (one row per reference)
    and ``category``."""
    return _read(path, "WebNLG", WEBNLG_SHAPE,
                 lambda d: d["entries"] if isinstance(d, dict) and isinstance(d.get("entries"), list) else None,
                 _webnlg_entry)


def read_dart(path: str | Path) -> hf.Dataset:
    """DART JSON (``dart-v1.1.1-full-*.json``) → ``Dataset`` with ``mr``, ``ref`` (one row per reference) and an
    empty ``category``."""
    return _read(path, "DART", DART_SHAPE, lambda d: d if isinstance(d, list) else None, _dart_entry)


def read_triples(path: str | Path) -> hf.Dataset:
    """A WebNLG or DART file, the reader picked by its shape (a JSON object or a JSON array)."""
    kind = triples_format(path)
    if kind is None:
        raise DataError(f"{path} is neither a WebNLG file ({WEBNLG_SHAPE}) nor a DART file ({DART_SHAPE}).")
    return read_webnlg(path) if kind == "webnlg" else read_dart(path)
