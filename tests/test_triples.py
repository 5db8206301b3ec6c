"""WebNLG and DART readers (the LoRA repository's JSON layouts), their splits, bad files, and a short
data-to-text run on a WebNLG-format file with the tiny random GPT-2 of test_recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipes import tiny_lm  # noqa: F401  (the module-scoped fixture)

from peftlab.cli import main
from peftlab.data import DataError, group_references, linearise, read_dart, read_triples, read_webnlg, triples_format
from peftlab.metrics import generation_metrics
from peftlab.recipes.text.data_to_text import data_format, load_pairs, seen_unseen_metrics


def webnlg_entry(i: int, triples: list[tuple[str, str, str]], lexes: list[tuple[str, str]],
                 category: str = "Airport") -> dict:
    """One entry of ``webnlg_challenge_2017/*.json`` as the LoRA repository ships it (extra fields included)."""
    return {str(i): {
        "category": category, "dbpedialinks": [], "links": [], "shape": "NA", "shape_type": "NA",
        "size": str(len(triples)), "xml_id": f"Id{i}",
        "lexicalisations": [{"comment": c, "lang": "", "lex": lex, "xml_id": f"Id{k}"}
                            for k, (lex, c) in enumerate(lexes, 1)],
        "modifiedtripleset": [{"subject": s, "property": p, "object": o} for s, p, o in triples],
        "originaltriplesets": {"originaltripleset": [[{"subject": s, "property": p, "object": o}
                                                      for s, p, o in triples]]},
    }}


def write_webnlg(path: Path, n: int = 3) -> Path:
    entries = [
        webnlg_entry(1, [("Aarhus", "leaderName", "Jacob_Bundsgaard")],
                     [("The leader of Aarhus is Jacob Bundsgaard.", "good")]),
        webnlg_entry(2, [("Aarhus_Airport", "runwayLength", "2702.0"), ("Aarhus_Airport", "cityServed", "Aarhus")],
                     [("Aarhus Airport's runway length is 2702.0 and it serves Aarhus.", "good"),
                      ("Aarhus airport runway 2702.0 Aarhus", "bad"),
                      ("Aarhus Airport serves Aarhus; its runway is 2702.0 long.", "good")]),
    ]
    entries += [webnlg_entry(i, [(f"Town_{i}", "population", str(100 * i))],
                             [(f"Town {i} has {100 * i} inhabitants.", "good"),
                              (f"The population of Town {i} is {100 * i}.", "good")],
                             "City" if i % 2 else "Athlete") for i in range(3, n + 1)]  # seen, unseen
    path.write_text(json.dumps({"entries": entries}, indent=1))
    return path


def write_dart(path: Path, n: int = 2) -> Path:
    entries = [
        {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill"]],
         "subtree_was_extended": True,
         "annotations": [{"source": "WikiSQL_decl_sents", "text": "A school from Mars Hill joined in 1973."},
                         {"source": "e2e", "text": "Mars Hill College, located in Mars Hill, joined in 1973."}]},
    ]
    entries += [{"tripleset": [[f"Team {i}", "NICKNAME", f"Wolves {i}"]], "subtree_was_extended": False,
                 "annotations": [{"source": "WikiSQL_decl_sents", "text": f"Team {i}'s nickname is the wolves {i}."}]}
                for i in range(2, n + 1)]
    path.write_text(json.dumps(entries, indent=2))
    return path


def test_linearise_is_the_lora_conversion_scripts_layout():
    assert linearise([("a", "p", "b"), ("c", "q", "d")]) == "a : p : b | c : q : d"


def test_webnlg_keeps_good_lexicalisations_and_links_them_to_the_linearised_triples(tmp_path):
    rows = read_webnlg(write_webnlg(tmp_path / "dev.json"))
    grouped = group_references(rows)
    assert list(grouped["mr"]) == ["Aarhus : leaderName : Jacob_Bundsgaard",
                                   "Aarhus_Airport : runwayLength : 2702.0 | Aarhus_Airport : cityServed : Aarhus",
                                   "Town_3 : population : 300"]
    assert grouped["references"][1] == ["Aarhus Airport's runway length is 2702.0 and it serves Aarhus.",
                                        "Aarhus Airport serves Aarhus; its runway is 2702.0 long."]  # "bad" dropped
    assert len(rows) == 5


def test_dart_lower_cases_predicates_and_keeps_every_annotation(tmp_path):
    rows = read_dart(write_dart(tmp_path / "dart-v1.1.1-full-dev.json"))
    assert rows[0] == {"mr": "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill",
                       "ref": "A school from Mars Hill joined in 1973.", "category": ""}
    assert [len(r) for r in group_references(rows)["references"]] == [2, 1]


def test_the_reader_is_picked_by_the_files_shape(tmp_path):
    webnlg, dart = write_webnlg(tmp_path / "a.json"), write_dart(tmp_path / "b.json")
    e2e = tmp_path / "e2e.txt"
    e2e.write_text("name[Zizzi], food[French] || Zizzi serves French food.\n")
    assert (triples_format(webnlg), triples_format(dart), triples_format(e2e)) == ("webnlg", "dart", None)
    assert (data_format(str(webnlg)), data_format(str(dart)), data_format(str(e2e))) == ("webnlg", "dart", "e2e")
    assert data_format("e2e-synthetic") == "e2e"
    assert read_triples(dart)["mr"] == read_dart(dart)["mr"]


def test_splits_keep_every_input_with_all_its_references(tmp_path):
    pairs = load_pairs(str(write_webnlg(tmp_path / "train.json", n=40)), split_seed=1)
    seen = {split: set(pairs[split]["mr"]) for split in pairs}
    assert all(seen[a].isdisjoint(seen[b]) for a in seen for b in seen if a < b)
    assert sum(len(pairs[s]) for s in pairs) == 1 + 2 + 2 * 38 and all(len(pairs[s]) for s in pairs)
    test = group_references(pairs["test"])
    assert all(len(refs) == 2 for mr, refs in zip(test["mr"], test["references"], strict=True) if "Town" in mr)


@pytest.mark.parametrize("content, message", [
    ({"entries": [{"1": {"modifiedtripleset": [{"subject": "a", "property": "p"}], "lexicalisations": []}}]},
     "entry 1 is not a WebNLG entry"),
    ({"benchmark": []}, "is not a WebNLG file"),
    ([{"tripleset": [["a", "p"]], "annotations": [{"text": "x"}]}], "entry 1 is not a DART entry"),
    ([{"tripleset": [["a", "p", "b"]]}], "entry 1 is not a DART entry"),
    ([{"tripleset": [["a", "p", "b"]], "annotations": []}], "holds no DART input with a triple and a reference"),
])
def test_a_file_of_the_wrong_shape_is_one_data_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        read_triples(path)


def test_wrong_shape_through_the_cli_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "webnlg.json"
    path.write_text('{"entries": [{"1": {"lexicalisations": []}}]}')
    code = main(["train", "--task", "data-to-text", "--model", str(tmp_path / "no-model"), "--data", str(path),
                 "--method", "lora", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "entry 1 is not a WebNLG entry" in err and "Traceback" not in err


def test_data_to_text_recipe_on_a_webnlg_file(tiny_lm, tmp_path):  # noqa: F811
    data = write_webnlg(tmp_path / "train.json", n=20)
    out = tmp_path / "run"
    code = main(["train", "--task", "data-to-text", "--model", str(tiny_lm), "--data", str(data), "--method", "lora",
                 "--lr", "1e-2", "--max-steps", "2", "--batch-size", "8", "--max-test-samples", "2",
                 "--num-beams", "2", "--max-new-tokens", "8", "--output-dir", str(out)])
    assert code == 0
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert {"bleu", "ter", "chrf", "nist", "rouge_l", "cider"} <= set(test) and test["tokenize_lower"] is True
    assert ("meteor" in test) != ("meteor" in test["skipped"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(" : " in r["mr"] for r in rows)
    seen = sum(r["category"] in ("Airport", "City") for r in rows)
    assert test.get("num_seen_mrs", 0) == seen and test.get("num_unseen_mrs", 0) == 2 - seen
    assert {"seen", "unseen"} - set(test) == set(test.get("skipped_parts", []))


def test_webnlg_rows_keep_their_category_and_dart_rows_have_none(tmp_path):
    rows = read_webnlg(write_webnlg(tmp_path / "w.json", n=5))
    grouped = group_references(rows)
    assert grouped["category"] == ["Airport", "Airport", "City", "Athlete", "City"]
    assert set(read_dart(write_dart(tmp_path / "d.json"))["category"]) == {""}
    split = load_pairs(str(write_webnlg(tmp_path / "train.json", n=40)), split_seed=1)
    assert all(set(group_references(split[s])["category"]) <= {"Airport", "City", "Athlete"} for s in split)


def test_webnlg_scores_on_seen_and_unseen_categories_are_the_metrics_of_each_part():
    hypotheses = ["the leader of aarhus is jacob", "town 3 has 300 people", "the population of town 4 is 400"]
    references = [["The leader of Aarhus is Jacob Bundsgaard."], ["Town 3 has 300 inhabitants."],
                  ["The population of Town 4 is 400.", "Town 4 has 400 inhabitants."]]
    scores = seen_unseen_metrics(hypotheses, references, ["Airport", "Athlete", "City"], tokenize_lower=True)
    assert (scores["num_seen_mrs"], scores["num_unseen_mrs"]) == (2, 1)
    seen = generation_metrics([hypotheses[0], hypotheses[2]], [references[0], references[2]], tokenize_lower=True)
    unseen = generation_metrics(hypotheses[1:2], references[1:2], tokenize_lower=True)
    assert scores["seen"]["bleu"] == pytest.approx(seen["bleu"]) and scores["unseen"]["bleu"] == unseen["bleu"]
    assert scores["seen"]["bleu"] != scores["unseen"]["bleu"]
    only_seen = seen_unseen_metrics(hypotheses[:1], references[:1], ["Food"], tokenize_lower=True)
    assert "unseen" not in only_seen and only_seen["skipped_parts"] == ["unseen"] and only_seen["num_unseen_mrs"] == 0
