"""E2E NLG (restaurant data-to-text): file readers and a small synthetic generator.

Two file formats are read:

* the LoRA repository's ``train.txt``: one ``meaning representation || reference`` pair per line;
* the official CSV (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``): columns ``mr``, ``ref``.

An MR appears once per reference; ``group_references`` gathers the references of each MR for
multi-reference scoring, and ``split_by_mr`` keeps all references of one MR in the same split.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import datasets as hf
import numpy as np
import pandas as pd

from .cache import DataError
from .datasets import split_indices

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
_FEATURES = hf.Features({"mr": hf.Value("string"), "ref": hf.Value("string")})


def parse_mr(mr: str) -> dict[str, str]:
    """Slots of an MR, in the official form ``name[X], eatType[Y]`` or the LoRA form ``name : X | Type : Y``."""
    if "[" in mr:
        return {k.strip(): v.strip() for k, v in re.findall(r"([^,\[\]]+)\[([^\]]*)\]", mr)}
    return {k.strip(): v.strip() for k, _, v in (part.partition(":") for part in mr.split("|")) if v}


def read_e2e(path: str | Path) -> hf.Dataset:
    """Read E2E pairs as a ``Dataset`` with columns ``mr``, ``ref`` (one row per reference)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"No such E2E file: {path}.")
    if path.suffix.lower() == ".csv":
        try:
            frame = pd.read_csv(path, encoding="utf-8", dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
            raise DataError(f"Could not read {path} as the E2E CSV (columns mr, ref): {e}") from None
        columns = {c.lower().strip(): c for c in frame.columns}
        if not {"mr", "ref"} <= set(columns):
            raise DataError(f"{path}: the E2E CSV needs columns 'mr' and 'ref'; found {list(frame.columns)}.")
        rows = [{"mr": m, "ref": r} for m, r in zip(frame[columns["mr"]], frame[columns["ref"]], strict=True)]
    else:
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            mr, sep, ref = line.partition("||")
            if not sep:
                raise DataError(f"{path} line {i} has no '||': expected 'meaning representation || reference'.")
            rows.append({"mr": mr.strip(), "ref": ref.strip()})
    if not rows:
        raise DataError(f"{path} holds no E2E pairs.")
    return hf.Dataset.from_list(rows, features=_FEATURES)


def group_references(data: hf.Dataset) -> hf.Dataset:
    """One row per distinct MR (first-seen order) with all its references in ``references`` (and its
    ``category``, where the rows have one: WebNLG)."""
    groups: dict[str, list[str]] = {}
    for mr, ref in zip(data["mr"], data["ref"], strict=True):
        groups.setdefault(mr, []).append(ref)
    grouped = {"mr": list(groups), "references": list(groups.values())}
    if "category" in data.column_names:
        categories = dict(zip(data["mr"], data["category"], strict=True))
        grouped["category"] = [categories[mr] for mr in groups]
    return hf.Dataset.from_dict(grouped)


def split_by_mr(
    data: hf.Dataset, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> hf.DatasetDict:
    """Seeded train/validation/test split in which every MR (with all its references) is in one split."""
    mrs = np.asarray(list(dict.fromkeys(data["mr"])))
    parts = split_indices(len(mrs), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    where = {mr: split for split, idx in parts.items() for mr in mrs[idx]}
    column = np.asarray([where[mr] for mr in data["mr"]])
    return hf.DatasetDict({s: data.select(np.flatnonzero(column == s)) for s in parts})


# ---- synthetic restaurant data ------------------------------------------------------------------------
_VALUES = {
    "name": ("The Vaults", "Blue Spice", "The Golden Lantern", "Alimentum", "The Copper Kettle", "Zizzi",
             "The Olive Grove", "Green Man", "The Rice Boat", "Fitzbillies", "The Punter", "Loch Fyne"),
    "eatType": ("restaurant", "pub", "coffee shop"),
    "food": ("Chinese", "English", "French", "Fast food", "Indian", "Italian", "Japanese"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
}
_PHRASES = {  # slot -> variants; reference k uses variant (k + offset) % len
    "area": ("in the {} area", "located in the {}", "in the {}"),
    "near": ("near {}", "close to {}", "not far from {}"),
    "priceRange": ("It has a {} price range.", "Its prices are {}.", "The price range is {}."),
    "customer rating": ("It has a {} customer rating.", "Customers rate it {}.", "Its customer rating is {}."),
    "familyFriendly": {
        "yes": ("It is family friendly.", "Children are welcome.", "It is kid friendly."),
        "no": ("It is not family friendly.", "It does not welcome children.", "It is not kid friendly."),
    },
}


def _a(word: str) -> str:
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def _reference(slots: dict[str, str], k: int, offset: int) -> str:
    name, place = slots["name"], slots.get("eatType", "place to eat")
    kind = f"{slots['food']} {place}" if "food" in slots else place
    article = _a(kind)
    opening = (f"{name} is {article}", f"There is {article} called {name}",
               f"{article[0].upper()}{article[1:]}, {name},")
    text = opening[k % 3] + "".join(
        " " + _PHRASES[s][(k + offset) % 3].format(slots[s]) for s in ("area", "near") if s in slots
    )
    text += "." if k % 3 != 2 else " is worth a visit."
    for s in ("priceRange", "customer rating", "familyFriendly"):
        if s in slots:
            variants = _PHRASES[s][slots[s]] if s == "familyFriendly" else _PHRASES[s]
            text += " " + variants[(k + offset) % 3].format(slots[s])
    return text


def generate_e2e(n: int, seed: int = 0) -> hf.Dataset:
    """``n`` distinct synthetic restaurant MRs in the official E2E form, each with 2-3 references.

    Returns a ``Dataset`` with columns ``mr``, ``ref`` (one row per reference), so that
    ``group_references`` and ``split_by_mr`` apply as for the real data.
    """
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(seen) < n:
        slots = {"name": rng.choice(_VALUES["name"])}
        optional = [s for s in SLOTS[1:] if s == "near" or rng.random() < (0.85 if s == "eatType" else 0.55)]
        for s in optional:
            slots[s] = rng.choice([v for v in _VALUES["name"] if v != slots["name"]]) if s == "near" else \
                rng.choice(_VALUES[s])
        if rng.random() < 0.5:
            slots.pop("near")
        mr = ", ".join(f"{s}[{slots[s]}]" for s in SLOTS if s in slots)
        if mr in seen or len(slots) < 3:
            continue
        seen.add(mr)
        offset = rng.randrange(3)
        rows += [{"mr": mr, "ref": _reference(slots, k, offset)} for k in range(rng.choice((2, 3)))]
    return hf.Dataset.from_list(rows, features=_FEATURES)
