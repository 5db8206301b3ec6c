"""Data: the fetch cache, real named data sets, file readers, instruction data and E2E."""

from __future__ import annotations

import hashlib
import html
import io
import json
import operator
import re
import subprocess
import tarfile
import zipfile
from collections import Counter

import datasets as hf
import pytest

from peftlab.data import (
    KNOWN_DATASETS,
    DataError,
    encode_labels,
    extract_answer,
    generate_arithmetic,
    generate_e2e,
    generate_format_tasks,
    generate_sentiment_instructions,
    group_references,
    instruction_mixture,
    label_names,
    load_dataset,
    parse_mr,
    read_e2e,
    read_instructions,
    split_by_mr,
)
from peftlab.data import cache as cache_mod
from peftlab.data import datasets as ds_mod
from peftlab.data.cache import Archive, extract_file, fetch_archive
from peftlab.files import atomic_write_folder


# ---- cache -------------------------------------------------------------------------------------------
def _archive_for(data: bytes, filename: str = "pkg-1.0.tar.gz") -> Archive:
    return Archive("pkg", "1.0", filename, hashlib.sha256(data).hexdigest(), source=True)


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the archive is already in the cache")


def test_cached_archive_is_used_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cache_mod.subprocess, "run", _no_pip)
    data = b"archive bytes"
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(data)  # a file placed by hand in the cache root
    assert fetch_archive(_archive_for(data)) == tmp_path / "pkg-1.0.tar.gz"


def test_sha256_mismatch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "pkg-1.0.tar.gz").write_bytes(b"tampered")
    with pytest.raises(DataError, match="sha256.*expected"):
        fetch_archive(_archive_for(b"original"))


def test_failed_download_names_package_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version")
    monkeypatch.setattr(cache_mod.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(DataError) as err:
        fetch_archive(_archive_for(b"x"))
    message = str(err.value)
    assert "pkg==1.0" in message and "PyPI" in message and "PEFTLAB_CACHE" in message
    assert not list((tmp_path / "downloads").iterdir())  # no temporary folder left behind


def test_extract_file_follows_nested_archives(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("corpus/data.txt", "hello £")
    outer = io.BytesIO()
    with tarfile.open(fileobj=outer, mode="w:gz") as t:
        info = tarfile.TarInfo("pkg-1.0/inner.zip")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(outer.getvalue())
    archive = _archive_for(outer.getvalue())
    path = extract_file(archive, "pkg-1.0/inner.zip", "corpus/data.txt")
    assert path.read_text(encoding="utf-8") == "hello £"
    assert path == tmp_path / "data" / "pkg-1.0" / "data.txt"
    with pytest.raises(DataError, match="no member 'missing.txt'"):
        extract_file(archive, "pkg-1.0/inner.zip", "missing.txt")


def test_atomic_write_folder_leaves_nothing_on_failure(tmp_path):
    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write_folder(tmp_path / "model", broken, replace=False)
    assert list(tmp_path.iterdir()) == []
    atomic_write_folder(tmp_path / "model", replace=False, write=lambda folder: (folder / "ok.txt").write_text("ok"))
    assert (tmp_path / "model" / "ok.txt").read_text() == "ok"
    atomic_write_folder(tmp_path / "model", replace=False, write=lambda folder: (folder / "new.txt").write_text("x"))
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["ok.txt"]  # a cache entry is kept
    with pytest.raises(RuntimeError):
        atomic_write_folder(tmp_path / "model", broken)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (tmp_path / "model" / "ok.txt").is_file()
    atomic_write_folder(tmp_path / "model", lambda folder: (folder / "new.txt").write_text("x"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # replaced, and no old copy left beside it
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.txt"]


# ---- real named data sets ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def movie():
    return load_dataset("movie-snippets", seed=0)


def _raw_vader(name: str) -> Counter:
    """(text, label) pairs parsed straight from the ground-truth file, independently of the loader."""
    path = extract_file(ds_mod.VADER, ds_mod._VADER_INNER, f"hutto_ICWSM_2014/{name}_GroundTruth.txt")
    pairs = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        _, score, text = line.split("\t")
        if float(score) != 0:
            pairs[(html.unescape(text).strip(), int(float(score) > 0))] += 1
    return pairs


def _pairs(split) -> Counter:
    return Counter(zip(split["text"], split["label"], strict=True))


def test_movie_snippets_rows_labels_and_partition(movie):
    assert sum(len(s) for s in movie.values()) == 10_605 - 37
    assert label_names(movie) == ["negative", "positive"]
    labels = Counter(label for s in movie.values() for label in s["label"])
    assert labels == {1: 5_242, 0: 5_326}
    # the three splits together are exactly the file's rows: disjoint and complete
    assert _pairs(movie["train"]) + _pairs(movie["validation"]) + _pairs(movie["test"]) == _raw_vader(
        "movieReviewSnippets")
    assert len(movie["test"]) == len(movie["validation"]) == round(0.1 * 10_568)
    # stratified: the positive share of the test split is that of the whole set
    assert abs(sum(movie["test"]["label"]) / len(movie["test"]) - 5_242 / 10_568) < 0.002


def test_splits_are_deterministic_per_seed(movie):
    again = load_dataset("movie-snippets", seed=0)
    other = load_dataset("movie-snippets", seed=1)
    assert again["test"]["text"] == movie["test"]["text"]
    assert other["test"]["text"] != movie["test"]["text"]
    smaller = load_dataset("movie-snippets", val_fraction=0.2, test_fraction=0.3)
    assert len(smaller["test"]) == round(0.3 * 10_568) and len(smaller["validation"]) == round(0.2 * 10_568)


def test_other_vader_sets_and_four_domains():
    sizes = {"tweets": 4_200 - 4, "amazon": 3_708 - 98, "nyt": 5_190 - 244}
    for name, size in sizes.items():
        data = load_dataset(name)
        assert sum(len(s) for s in data.values()) == size, name
    four = load_dataset("sentiment-4domains")
    domains = Counter(d for s in four.values() for d in s["domain"])
    assert domains == {"movie": 10_568, **sizes}
    test_domains = Counter(four["test"]["domain"])  # stratified by domain and label
    assert all(abs(test_domains[d] - 0.1 * n) <= 2 for d, n in domains.items())


def test_tweet_corpora_three_classes():
    tweets = load_dataset("crowdflower-tweets")
    assert label_names(tweets) == ["negative", "neutral", "positive"]
    counts = Counter(label for s in tweets.values() for label in s["label"])
    assert counts == {0: 16_186, 1: 15_018, 2: 6_954}
    airline = load_dataset("airline-tweets")
    texts = [t.lower() for s in airline.values() for t in s["text"]]
    assert 14_000 < len(texts) < 15_000
    assert all(any(a in t for a in ds_mod.AIRLINES) for t in texts)


def test_unknown_name_lists_known_names():
    with pytest.raises(DataError) as err:
        load_dataset("movie_snippets")
    assert all(name in str(err.value) for name in KNOWN_DATASETS)


# ---- local files -------------------------------------------------------------------------------------
def test_csv_with_string_labels(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg"), ("fine", "pos"), ("awful", "neg")] * 10
    path = tmp_path / "d.csv"
    path.write_text("sentence,sentiment\n" + "\n".join(f"{t},{s}" for t, s in rows))
    data = load_dataset(path, text_column="sentence", label_column="sentiment", seed=3)
    assert label_names(data) == ["neg", "pos"]
    assert sorted(data["train"].column_names) == ["label", "text"]
    train = data["train"]
    assert all(label == (0 if text in ("bad film", "awful") else 1)
               for text, label in zip(train["text"], train["label"], strict=True))
    assert sum(len(s) for s in data.values()) == 40


def test_jsonl_text_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"s1": f"a{i}", "s2": f"b{i}", "y": i % 3}) for i in range(30)))
    data = load_dataset(path, text_column=("s1", "s2"), label_column="y")
    row = data["train"][0]
    assert row["text_pair"] == "b" + row["text"][1:] and row["label"] == int(row["text"][1:]) % 3
    assert label_names(data) == ["0", "1", "2"]


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,stars\nnice,5\n")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    message = str(err.value)
    assert "['text', 'label']" in message and "['review', 'stars']" in message and "text_column" in message


def test_json_that_is_not_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("text,label\nhello,1\n")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_dataset(path)
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    with pytest.raises(DataError, match="rename it to .jsonl"):
        load_dataset(lines)


@pytest.mark.parametrize("name, content", [("e.csv", ""), ("e.json", "[]"), ("e.jsonl", "\n"),
                                           ("h.csv", "text,label\n")])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="empty|no data rows|no records"):
        load_dataset(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="No such file"):
        load_dataset(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(tmp_path)


def test_encode_labels():
    codes, names = encode_labels([-1, 1, 1, -1])
    assert codes.tolist() == [0, 1, 1, 0] and names == ["-1", "1"]
    codes, names = encode_labels([2, 0, 1])
    assert codes.tolist() == [2, 0, 1] and names == ["0", "1", "2"]
    values, names = encode_labels([0.5, 3.2])
    assert names is None and values.tolist() == pytest.approx([0.5, 3.2])


def test_hub_names(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(ds_mod.hf, "load_dataset", offline)
    with pytest.raises(DataError, match=r"Hugging Face Hub failed \(ConnectionError"):
        load_dataset("org/sentiment")

    glue = hf.DatasetDict({  # GLUE layout: the test split is unlabelled (-1)
        "train": hf.Dataset.from_dict({"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}),
        "validation": hf.Dataset.from_dict({"sentence": ["v0", "v1"], "label": [0, 1]}),
        "test": hf.Dataset.from_dict({"sentence": ["t0"], "label": [-1]}),
    })
    calls = []
    monkeypatch.setattr(ds_mod.hf, "load_dataset", lambda *a: calls.append(a) or glue)
    data = load_dataset("nyu-mll/glue:sst2", text_column="sentence", val_fraction=0.25)
    assert calls == [("nyu-mll/glue", "sst2")]
    assert data["test"]["text"] == ["v0", "v1"] and len(data["validation"]) == 5 and len(data["train"]) == 15


# ---- instruction data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, answer", [
    ("so 3 + 4 = 7.\nThe answer is: 7", "7"), ("Natalia sold 72 clips.\n#### 72", "72"),
    ("The answer is: $1,250.", "1250"), ("the answer is 2.50", "2.5"), ("#### -3", "-3"),
    ("42", "42"), ("no number here", None), ("", None),
    ("The answer is: 1 then The answer is: 2", "2"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_arithmetic_problems_are_correct():
    data = generate_arithmetic(200, seed=5)
    assert data.column_names == ["instruction", "input", "output"]
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
    for row in data:
        a, op, b, result = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["output"])[-1]
        assert ops[op](int(a), int(b)) == int(result)
        assert row["output"].endswith(f"The answer is: {result}") and extract_answer(row["output"]) == result
    assert generate_arithmetic(5, seed=5)["instruction"] == data["instruction"][:5]
    assert generate_arithmetic(5, seed=6)["instruction"] != data["instruction"][:5]


def test_format_tasks():
    for row in generate_format_tasks(30, seed=1):
        words = row["input"].split()
        expected = {"Reverse the order of these words.": words[::-1], "Sort these words alphabetically.":
                    sorted(words), "Write these words in upper case.": [w.upper() for w in words]}
        assert row["output"].split() == expected[row["instruction"]]


def test_sentiment_instructions_and_mixture(movie):
    rows = generate_sentiment_instructions(20, seed=2, split="test")
    truth = dict(zip(movie["test"]["text"], movie["test"]["label"], strict=False))
    assert all(["negative", "positive"][truth[r["input"]]] == r["output"] for r in rows)
    mix = instruction_mixture(6, seed=0)
    assert Counter(mix["task"]) == {"arithmetic": 6, "sentiment": 6, "format": 6}
    assert mix["task"] != sorted(mix["task"])  # shuffled
    with pytest.raises(DataError, match="known: arithmetic, sentiment, format"):
        instruction_mixture(2, tasks=("poetry",))


def test_read_instruction_layouts(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"query": "1+1?", "response": "2\nThe answer is: 2", "type": "GSM"}) + "\n")
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "2*3?", "answer": "2*3=6\n#### 6"}) + "\n")
    assert read_instructions(alpaca)[0] == {"instruction": "Add", "input": "1 2", "output": "3"}
    assert read_instructions(meta)[0] == {"instruction": "1+1?", "input": "", "output": "2\nThe answer is: 2"}
    assert extract_answer(read_instructions(gsm)[0]["output"]) == "6"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(DataError, match=r"keys \['completion', 'prompt'\]"):
        read_instructions(bad)
    broken = tmp_path / "c.jsonl"
    broken.write_text('{"query": "a", "response": "b"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_instructions(broken)


# ---- E2E -----------------------------------------------------------------------------------------------
def test_read_e2e_both_formats(tmp_path):
    lora = tmp_path / "train.txt"
    lora.write_text("name : The Vaults | Type : pub || The Vaults is a pub .\n"
                    "name : The Vaults | Type : pub || A pub called The Vaults .\n\n"
                    "name : Zizzi | price : less than £ 20 || Zizzi is cheap .\n", encoding="utf-8")
    data = read_e2e(lora)
    assert data[0] == {"mr": "name : The Vaults | Type : pub", "ref": "The Vaults is a pub ."}
    grouped = group_references(data)
    assert grouped["references"] == [["The Vaults is a pub .", "A pub called The Vaults ."], ["Zizzi is cheap ."]]
    assert parse_mr(grouped[1]["mr"]) == {"name": "Zizzi", "price": "less than £ 20"}

    csv = tmp_path / "devset.csv"
    csv.write_text('mr,ref\n"name[Zizzi], priceRange[less than £20]","Zizzi, cheap."\n', encoding="utf-8")
    row = read_e2e(csv)[0]
    assert parse_mr(row["mr"]) == {"name": "Zizzi", "priceRange": "less than £20"} and row["ref"] == "Zizzi, cheap."

    bad = tmp_path / "bad.txt"
    bad.write_text("name : A || ok\nno separator here\n")
    with pytest.raises(DataError, match="line 2 has no '\\|\\|'"):
        read_e2e(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("meaning,text\na,b\n")
    with pytest.raises(DataError, match="columns 'mr' and 'ref'"):
        read_e2e(wrong)


def test_generate_e2e_is_faithful_and_split_by_mr():
    data = generate_e2e(60, seed=1)
    grouped = group_references(data)
    assert len(grouped) == 60
    for mr, refs in zip(grouped["mr"], grouped["references"], strict=True):
        assert 2 <= len(refs) <= 3 and len(set(refs)) == len(refs)
        slots = parse_mr(mr)
        assert "name" in slots and len(slots) >= 3
        for slot, value in slots.items():
            if slot != "familyFriendly":
                assert all(value in ref for ref in refs), (slot, value, refs)
    assert generate_e2e(60, seed=1)["ref"] == data["ref"]
    splits = split_by_mr(data, seed=0)
    mrs = {name: set(split["mr"]) for name, split in splits.items()}
    assert not (mrs["train"] & mrs["test"]) and not (mrs["train"] & mrs["validation"])
    assert sum(len(s) for s in splits.values()) == len(data) and len(mrs["test"]) == 6
