"""The ``peftlab`` command line, run in-process (``main([...])``) on a tiny random BERT and small CSV files.

The tiny model is a 2-layer, hidden-32 BERT with the MiniLM tokenizer (``initializer_range=0.1``: with the
default 0.02 the attention passes almost no signal and nothing learns in a few steps). The keyword task
(label = whether "excellent" occurs) is learnt by HRA in 40 steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_classifier, write_keyword_csv

from peftlab.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_classifier(root / "model")
    return {"root": root, "model": root / "model", "keyword": write_keyword_csv(root / "keyword.csv", 300),
            "small": write_keyword_csv(root / "small.csv", 40, seed=1)}


@pytest.fixture(scope="module")
def trained(tiny) -> Path:
    """HRA r=8 trained 40 steps on the keyword task (used by the eval / merge / export / inspect tests)."""
    out = tiny["root"] / "run-hra"
    code = main(["train", "--model", str(tiny["model"]), "--data", str(tiny["keyword"]), "--method", "hra", "--r", "8",
                 "--lr", "2e-2", "--max-steps", "40", "--batch-size", "16", "--eval-steps", "20",
                 "--output-dir", str(out)])
    assert code == 0
    return out


def adapter_logits(tiny, folder: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab import AdapterModel

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    model = AdapterModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny["model"]), folder)
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits


TEXTS = ["the movie was excellent and long", "a slow old film", "excellent"]


def error_line(capsys) -> str:
    """The single stderr line of a bad-input exit (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


# -- train ----------------------------------------------------------------------------------------------------------
def test_train_learns_the_keyword_task_and_writes_its_outputs(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["method"] == "hra" and metrics["metric"] == "accuracy"
    assert metrics["initial_test"]["accuracy"] < 0.75  # the untrained head: chance level
    assert metrics["test"]["accuracy"] > 0.9
    assert metrics["global_step"] == 40 and metrics["resumed_from_step"] == 0
    assert metrics["trainable_params"] == 4 * 32 * 8 + (32 * 2 + 2)  # hra_u on q, v of 2 layers + the head
    assert metrics["best_checkpoint"].endswith(("checkpoint-20", "checkpoint-40"))
    assert metrics["peak_memory_mb"] > 0 and metrics["seconds_per_step"] > 0
    assert (trained / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["method"] == "hra" and config["modules_to_save"] == ["classifier"]
    assert config["target_modules"] == ["query", "value"]
    assert (trained / "adapter_model.safetensors").is_file()
    assert json.loads((trained / "run_config.json").read_text())["options"]["lr"] == 2e-2


def test_eval_of_the_saved_adapter_gives_the_training_run_metrics(trained, tmp_path, capsys):
    expected = json.loads((trained / "metrics.json").read_text())["test"]
    assert main(["eval", "--adapter", str(trained), "--output", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert got["accuracy"] == expected["accuracy"]
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert "test accuracy of" in capsys.readouterr().out


def test_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"  # options from a YAML file; command-line flags override them
    config.write_text(f"model: {tiny['model']}\ndata: {tiny['small']}\nmethod: lora\nlr: 0.01\nmax_steps: 100\n"
                      f"batch_size: 16\neval_steps: 2\noutput_dir: {out}\nno_initial_eval: true\n")
    assert main(["train", "--config", str(config), "--max-steps", "4"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert first["global_step"] == 4 and first["method"] == "lora"
    assert main(["train", "--config", str(config), "--max-steps", "8", "--resume"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert second["resumed_from_step"] == 4 and second["steps_this_run"] == 4 and second["global_step"] == 8
    assert "resumed" in json.loads((out / "run_config.json").read_text())


def test_output_dir_is_never_overwritten_without_overwrite(trained, tiny, tmp_path, capsys):
    before = (trained / "metrics.json").read_bytes()
    base = ["train", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--max-steps", "1"]
    assert main([*base, "--method", "hra", "--output-dir", str(trained)]) == 2
    assert "already holds an earlier result" in error_line(capsys)
    assert main([*base, "--method", "lora", "--output-dir", str(trained)]) == 2
    assert "already holds a different run" in error_line(capsys)
    assert main([*base, "--method", "lora", "--output-dir", str(trained), "--resume"]) == 2
    line = error_line(capsys)
    assert "holds a different run" in line and "method: 'hra' -> 'lora'" in line
    assert (trained / "metrics.json").read_bytes() == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([*base, "--output-dir", str(foreign), "--overwrite"]) == 2
    assert "holds no peftlab run" in error_line(capsys)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main([*base, "--output-dir", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "no run to resume" in error_line(capsys)


# -- bad input ------------------------------------------------------------------------------------------------------
BAD_FILES = {
    "missing-column": ("data.csv", "sentence,label\nnice film,1\nbad film,0\n", [], "missing column(s) ['text']"),
    "empty": ("data.csv", "text,label\n", [], "no data rows"),
    "label-range": ("data.csv", "text,label\n" + "".join(f"row {i},{i % 3}\n" for i in range(12)),
                    ["--num-labels", "2"], "out of range"),
    "not-json": ("data.json", "this is not JSON", [], "is not valid JSON"),
    "wrong-type": ("data.txt", "text,label\nx,1\n", [], "unsupported file type"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_gives_one_error_line_and_exit_code_2(case, tiny, tmp_path, capsys):
    name, content, flags, message = BAD_FILES[case]
    (tmp_path / name).write_text(content)
    code = main(["train", "--model", str(tiny["model"]), "--data", str(tmp_path / name), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "out"), *flags])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("peftlab train: error:") and message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "no-such-model"], "Unknown model 'no-such-model'"),
        (["--data", "no-such-data"], "Unknown data set 'no-such-data'"),
        (["--method", "dora"], "invalid choice: 'dora'"),
        (["--adapter-arg", "colour=red"], "HRAConfig has no field(s) ['colour']"),
        (["--target-modules", "q_proj"], "matched nothing"),
        (["--r", "0"], "must be a positive integer"),
    ],
)
def test_bad_options_give_one_error_line_and_exit_code_2(flags, message, tiny, tmp_path, capsys):
    argv = {"--model": str(tiny["model"]), "--data": str(tiny["small"]), "--max-steps": "1",
            "--output-dir": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        argv[flag] = value
    assert main(["train", *[x for pair in argv.items() for x in pair]]) == 2
    line = error_line(capsys)
    assert message in line
    if "Unknown model" in message:
        assert "minilm" in line and "smollm2-135m" in line  # the known names are listed
    if "Unknown data set" in message:
        assert "movie-snippets" in line and "airline-tweets" in line


def test_bad_config_file_and_missing_adapter(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("colour: red\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown option 'colour'" in error_line(capsys)
    assert main(["eval", "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in error_line(capsys)
    assert main(["eval"]) == 2
    assert "--adapter" in error_line(capsys)


@pytest.mark.parametrize("command", ["", "train", "eval", "compare", "merge", "export", "inspect"])
def test_help_everywhere(command, capsys):
    assert main([command, "--help"] if command else ["--help"]) == 0
    assert "usage: peftlab" in capsys.readouterr().out


# -- compare, merge, export, inspect ----------------------------------------------------------------------------------
def test_compare_tabulates_every_method(tiny, tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(tiny["model"]), "--data", str(tiny["small"]),
                 "--methods", "hra,lora,full,linear-probe", "--seeds", "2", "--max-steps", "1", "--batch-size", "16",
                 "--no-initial-eval", "--output-dir", str(out)])
    assert code == 0
    table = capsys.readouterr().out.split("| method |", 1)[1].split("\n\n", 1)[0]  # the main table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"hra", "lora", "full", "linear-probe"}
    assert all("±" in line for line in rows.values())
    result = json.loads((out / "compare.json").read_text())
    params = {r["method"]: r["trainable_params"] for r in result["rows"]}
    assert params["linear-probe"] == 66 and params["hra"] == 1090 and params["lora"] == 2 * 2 * (2 * 8 * 32) + 66
    assert params["full"] > 900_000
    assert {r["seeds"] for r in result["rows"]} == {2}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG" and (out / "compare.md").is_file()
    assert not list(out.glob("*/seed-*/checkpoint-*"))  # comparison runs keep only their final result


def test_merge_writes_a_plain_checkpoint_with_the_same_logits(trained, tiny, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained), "--out", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer is saved with it
    with torch.no_grad():
        logits = merged(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, adapter_logits(tiny, trained, TEXTS), atol=1e-5, rtol=1e-4)
    assert not any("hra" in k for k in merged.state_dict())
    capsys.readouterr()
    assert main(["merge", "--adapter", str(trained), "--out", str(out)]) == 2
    assert "is not empty" in error_line(capsys)


def test_export_to_peft_loads_with_peft_and_matches(trained, tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "peft"
    assert main(["export", "--adapter", str(trained), "--format", "peft", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "HRA"
    base = AutoModelForSequenceClassification.from_pretrained(tiny["model"])
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, adapter_logits(tiny, trained, TEXTS), atol=1e-5, rtol=1e-4)


def test_inspect_prints_config_parameters_and_orthogonality(trained, capsys):
    from safetensors.torch import load_file

    from peftlab.methods.hra import orthogonality_penalty

    assert main(["inspect", str(trained)]) == 0
    out = capsys.readouterr().out
    assert 'method: "hra"' in out
    assert "parameters per module (5 modules, 1,090 in all)" in out
    assert "‖I − ÛᵀÛ‖_F" in out
    u = load_file(str(trained / "adapter_model.safetensors"))["bert.encoder.layer.0.attention.self.query.hra_u"]
    expected = float(orthogonality_penalty(u).sqrt())
    line = next(x for x in out.splitlines() if x.strip().startswith("bert.encoder.layer.0.attention.self.query")
                and "hra_u" not in x)
    assert float(line.split()[-1]) == pytest.approx(expected, abs=1e-4)
    assert "metrics: test accuracy" in out


def test_mtlora_structure_flag_reaches_the_config(tiny, tmp_path, capsys):
    out = tmp_path / "mtlora"
    code = main(["train", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--method", "mtlora",
                 "--structure", "dtsm", "--adapter-arg", "init=identity", "--max-steps", "1", "--batch-size", "16",
                 "--no-initial-eval", "--output-dir", str(out)])
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["method"], config["structure"], config["init"]) == ("mtlora", "dtsm", "identity")
    capsys.readouterr()
    clash = main(["train", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--method", "mtlora-icfm",
                  "--structure", "dtsm", "--output-dir", str(tmp_path / "clash")])
    assert clash == 2 and "mtlora-icfm means structure='icfm'" in error_line(capsys)


def test_hydralora_num_heads_auto_uses_estimate_num_heads(tiny, tmp_path, capsys):
    """Texts from two disjoint vocabularies: --num-heads auto must build 2 heads, saved in the config."""
    rng = random.Random(0)
    topics = ["alpha beta gamma delta epsilon zeta".split(), "red green blue cyan magenta yellow".split()]
    lines = ["text,label"] + [f"{' '.join(rng.choices(topics[i % 2], k=6))},{i % 2}" for i in range(120)]
    data = tmp_path / "two_topics.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "hydra"
    code = main(["train", "--model", str(tiny["model"]), "--data", str(data), "--method", "hydralora", "--r", "4",
                 "--num-heads", "auto", "--max-steps", "2", "--batch-size", "8", "--output-dir", str(out)])
    assert code == 0
    assert "estimate_num_heads found 2 cluster(s)" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["num_heads"] == 2
    assert main(["train", "--model", str(tiny["model"]), "--data", str(data), "--method", "hydralora",
                 "--num-heads", "0", "--output-dir", str(tmp_path / "bad")]) == 2


def test_compare_runs_method_variants_with_their_config_fields(tiny, tmp_path, capsys):
    out = tmp_path / "variants"
    code = main(["compare", "--model", str(tiny["model"]), "--data", str(tiny["small"]),
                 "--methods", "lora,lora:alpha=32:dropout=0.1", "--seeds", "1", "--max-steps", "1",
                 "--batch-size", "16", "--no-initial-eval", "--output-dir", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"lora", "lora:alpha=32:dropout=0.1"}
    plain = json.loads((out / "lora" / "seed-0" / "adapter_config.json").read_text())
    variant = json.loads((out / "lora_alpha_32_dropout_0.1" / "seed-0" / "adapter_config.json").read_text())
    assert (plain["alpha"], plain["dropout"]) == (8.0, 0.0) and (variant["alpha"], variant["dropout"]) == (32, 0.1)
    capsys.readouterr()
    bad = main(["compare", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--methods",
                "lora,lora:alhpa=2", "--output-dir", str(tmp_path / "bad")])
    assert bad == 2 and "alhpa" in error_line(capsys) and not (tmp_path / "bad").exists()
    clash = main(["compare", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--methods",
                  "lora,mtlora-icfm:structure=shim", "--output-dir", str(tmp_path / "clash")])
    assert clash == 2 and "mtlora-icfm means structure='icfm'" in error_line(capsys)
    assert not (tmp_path / "clash").exists()  # refused before the first run


def test_compare_reports_accuracy_per_domain_when_the_data_have_a_domain_column(tiny, tmp_path):
    """A CSV with a ``domain`` column: every run reports accuracy and macro F1 per domain (test split), compare
    tabulates them as ``accuracy/<domain>`` and ``eval`` reports them too. The per-domain scores are recomputed here
    with scikit-learn from test_items.jsonl (label, prediction per item), each item joined to its CSV row by the hash
    of its token ids."""
    import csv

    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoTokenizer

    from peftlab.recipes.test_items import item_key

    domains = ["movie", "tweets", "amazon", "nyt"]
    keyword = write_keyword_csv(tmp_path / "kw.csv", 200, seed=2, labels={i: 1 - i % 2 for i in range(0, 200, 7)})
    with open(keyword, newline="") as file:
        rows = list(csv.DictReader(file))
    for i, row in enumerate(rows):  # each domain holds both labels
        row["domain"] = domains[(i // 2) % 4]
    data = tmp_path / "kw-domains.csv"
    with open(data, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["text", "label", "domain"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(tiny["model"]), "--data", str(data), "--methods", "hra", "--seeds", "1",
                 "--max-steps", "40", "--batch-size", "16", "--lr", "2e-2", "--no-initial-eval", "--report-to", "none",
                 "--output-dir", str(out)])
    assert code == 0
    run = out / "hra" / "seed-0"
    test = json.loads((run / "metrics.json").read_text())["test"]
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    domain_of: dict[str, set[str]] = {}
    for row in rows:
        digest = item_key(0, tokenizer(row["text"])["input_ids"]).split("-")[1]
        domain_of.setdefault(digest, set()).add(row["domain"])
    items = [json.loads(line) for line in (run / "test_items.jsonl").read_text().splitlines()]
    assert len(items) == 20
    by_domain: dict[str, list[dict]] = {}
    for item in items:
        (domain,) = domain_of[item["key"].split("-")[1]]  # one CSV text (or same-domain duplicates) per item
        by_domain.setdefault(domain, []).append(item)
    assert sorted(by_domain) == sorted(domains) and sorted(test["accuracy_by_domain"]) == sorted(domains)
    for domain, mine in by_domain.items():
        labels, predictions = [r["label"] for r in mine], [r["prediction"] for r in mine]
        assert test["accuracy_by_domain"][domain] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
        assert test["f1_macro_by_domain"][domain] == pytest.approx(f1_score(labels, predictions, average="macro"),
                                                                   abs=1e-12)
    assert len(set(test["accuracy_by_domain"].values())) > 1  # the domains differ, so a mix-up would show
    assert main(["eval", "--adapter", str(run), "--output", str(tmp_path / "eval.json")]) == 0  # eval: the same
    again = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert again["accuracy_by_domain"] == pytest.approx(test["accuracy_by_domain"], abs=1e-12)
    other = json.loads((out / "compare.json").read_text())["runs"][0]["other_metrics"]
    assert {k: v for k, v in other.items() if k.startswith("accuracy/")} == {
        f"accuracy/{d}": test["accuracy_by_domain"][d] for d in sorted(domains)}
    md = (out / "compare.md").read_text().split("Other test metrics")[1]
    header, _, row = md.strip().splitlines()[2:5]
    cells = dict(zip(header.split("|")[2:-1], row.split("|")[2:-1], strict=True))
    for domain in domains:
        assert cells[f" accuracy/{domain} "] == f" {test['accuracy_by_domain'][domain]:.4f} ± 0.0000 "
