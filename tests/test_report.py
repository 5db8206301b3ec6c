"""``peftlab report``: pages of a real tiny train run, comparison, analysis and image run, read back with the
standard library's ``html.parser``: every image is an embedded PNG that PIL opens, nothing points outside the page,
the numbers shown are the result files' numbers, hostile text is escaped, and bad folders give one-line errors."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_classifier, write_keyword_csv
from PIL import Image

from peftlab.cli import main
from peftlab.commands.report import report
from peftlab.errors import ReportError

HOSTILE = "<script>alert(1)</script>"


class Page(HTMLParser):
    """What a report page holds: its tags, image sources, links, ids, text, and tables by their heading."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.tables: list[tuple[str, str, list[list[dict]]]] = []  # (section id, heading, rows of cells)
        self._sections: list[str] = []
        self._heading: list[str] | None = None
        self._last_heading = ""
        self._rows: list[list[dict]] | None = None
        self._cell: dict | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for name in ("src", "href", "action", "data", "poster"):
            if name in attrs:
                (self.images if tag == "img" and name == "src" else self.links).append(attrs[name])
        if tag == "section":
            self._sections.append(attrs.get("id", ""))
        if tag in ("h2", "h3", "h4", "h5", "summary"):
            self._heading = []
        elif tag == "table":
            self._rows = []
            self.tables.append((self._sections[-1] if self._sections else "", self._last_heading, self._rows))
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = {"text": "", "title": attrs.get("title"), "href": None}
            self._rows[-1].append(self._cell)
        elif tag == "a" and self._cell is not None:
            self._cell["href"] = attrs.get("href")

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "h4", "h5", "summary") and self._heading is not None:
            self._last_heading = "".join(self._heading).split(" (")[0].strip()
            self._heading = None
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "table":
            self._rows = None
        elif tag == "section":
            self._sections.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell["text"] += data

    def table(self, heading: str, section: str | None = None) -> dict[str, list[dict]]:
        """The first table under ``heading`` (its first words) in ``section`` (an id; default any), as first column
        text -> the row's cells (the header row left out)."""
        found = [rows for where, title, rows in self.tables if title.startswith(heading) and section in (None, where)]
        assert found, f"no table {heading!r} in {section}: {[t[:2] for t in self.tables]}"
        return {row[0]["text"]: row for row in found[0][1:]}

    def header(self, heading: str) -> list[str]:
        rows = next(rows for _, title, rows in self.tables if title.startswith(heading))
        return [c["text"] for c in rows[0]]


def read_page(path: Path) -> Page:
    """Parse a page and check what every page must satisfy: embedded PNGs only, no reference outside it."""
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "url(" not in html and "@import" not in html
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as image:
            image.load()
            assert image.format == "PNG" and image.width > 0
    for href in page.links:
        assert href.startswith("#") and href[1:] in page.ids, href  # links stay inside the page
    return page


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny comparison (HRA, LoRA; 1 seed, 2 steps without warm-up, evaluated every step) of the keyword task; its
    HRA run is the train run of the tests (a ``peftlab train`` run like any other). Without warm-up the first step
    already changes the weights (the best checkpoint, reloaded at the end, may be the first)."""
    root = tmp_path_factory.mktemp("report")
    save_tiny_classifier(root / "model")
    data = write_keyword_csv(root / "small.csv", 40, seed=1)
    assert main(["compare", "--model", str(root / "model"), "--data", str(data), "--batch-size", "16", "--methods",
                 "hra,lora", "--seeds", "1", "--max-steps", "2", "--eval-steps", "1", "--warmup", "0",
                 "--output-dir", str(root / "compare")]) == 0
    return {"root": root, "run": root / "compare" / "hra" / "seed-0", "compare": root / "compare"}


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "report.html"))
    return to


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_run_page_shows_the_runs_metrics_and_curve(made, capsys):
    assert main(["report", str(made["run"])]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {made['run'] / 'report.html'} (")
    page = read_page(made["run"] / "report.html")
    metrics = metrics_of(made["run"])
    test = page.table("Test metrics")
    assert set(test) == set(metrics["test"])
    for key, value in metrics["test"].items():  # columns: metric, before training, after training
        assert float(test[key][2]["title"]) == value and float(test[key][1]["title"]) == metrics["initial_test"][key]
    assert [row[0]["text"] for row in page.table("Validation during training").values()] == ["1", "2"]
    assert len(page.images) == 1  # training_curve.png
    text = "".join(page.text)
    assert "hra" in text and f"{metrics['trainable_params']:,} of {metrics['total_params']:,}" in text


def test_compare_page_lists_every_method_and_links_each_run(made):
    report([made["compare"]])
    page = read_page(made["compare"] / "report.html")
    result = json.loads((made["compare"] / "compare.json").read_text())
    table = page.table("Comparison")
    assert set(table) == {"hra", "lora"}
    for row in result["rows"]:
        cells = table[row["method"]]
        assert cells[0]["href"] == f"#run-{row['method']}-seed-0"
        assert cells[2]["title"] == f"{row['mean']!r} ± {row['std']!r}"
        assert int(cells[4]["title"]) == row["trainable_params"]
    for method in ("hra", "lora"):  # each run's own section, with its own metrics
        test = metrics_of(made["compare"] / method / "seed-0")["test"]
        shown = page.table("Test metrics", section=f"run-{method}-seed-0")
        assert {k: float(row[-1]["title"]) for k, row in shown.items()} == test  # the "after training" column
    runs = page.table("Runs")
    assert set(runs) == {"hra/seed-0", "lora/seed-0"}
    for run in result["runs"]:
        assert float(runs[f"{run['method']}/seed-0"][2]["title"]) == run["value"]
    assert len(page.images) == 1 + 2  # compare.png, each run's training curve


def test_compare_page_shows_trials_and_further_row_keys(made, tmp_path):
    folder = copy(made["compare"], tmp_path / "tuned")
    result = json.loads((folder / "compare.json").read_text())
    for row in result["rows"]:
        row["interval_95"] = [row["mean"] - 0.125, row["mean"] + 0.125]
    result["tuned"] = {"hra": {"lr": 0.02, "value": 0.5, "trials": 2},
                       "lora": {"lr": 0.004, "value": 0.75, "trials": 2}}
    result["paired"] = {"baseline": "lora", "rows": [{"method": "hra", "difference": -0.25, "p_value": 0.5}],
                        "note": HOSTILE}
    (folder / "moved").mkdir()
    for run in result["runs"]:  # a run's own folder, where compare.json names it
        run["folder"] = f"moved/{run['method']}"
        (folder / run["method"] / "seed-0").rename(folder / run["folder"])
    (folder / "compare.json").write_text(json.dumps(result))
    (folder / "trials.csv").write_text("trial,method,lr,value\n0,hra,0.01,0.5\n1,lora,0.003,0.75\n")
    shutil.copy(folder / "compare.png", folder / "trials.png")
    report([folder])
    page = read_page(folder / "report.html")
    assert page.header("Comparison")[-1] == "interval 95"
    hra = result["rows"][0]
    assert page.table("Comparison")["hra"][-1]["text"] == f"[{hra['mean'] - 0.125:.4f}, {hra['mean'] + 0.125:.4f}]"
    trials = page.table("Trials")
    assert set(trials) == {"0", "1"} and trials["1"][3]["text"] == "0.7500"
    tuned = page.table("Tuned")
    assert page.header("Tuned") == ["", "lr", "value", "trials"] and float(tuned["lora"][1]["title"]) == 0.004
    assert float(page.table("Paired")["hra"][1]["title"]) == -0.25
    assert f"note: {HOSTILE}" in "".join(page.text)
    for method in ("hra", "lora"):  # the runs found in the folders compare.json names
        assert page.table("Comparison")[method][0]["href"] == f"#run-{method}-seed-0"
        assert f"run-{method}-seed-0" in page.ids
    assert len(page.images) == 2 + 2  # compare.png, trials.png, the runs' curves


def test_analysis_page_shows_the_distances(made, tmp_path):
    from peftlab.commands.analyze import analyze

    lora = made["compare"] / "lora" / "seed-0"
    other = copy(lora, tmp_path / "lora-b")
    analyze([str(lora), str(other)], ["a", "b"], tmp_path / "analysis")
    report([tmp_path / "analysis"], out=tmp_path / "page.html")
    page = read_page(tmp_path / "page.html")
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    table = page.table("Cosine distance")
    assert set(table) == set(data["factors"])
    for role, numbers in data["factors"].items():
        between = numbers["mean"]["between"]
        assert float(table[role][2]["title"]) == between
    assert set(page.table("Runs")) == set(data["runs"]) and len(page.images) == 1


def test_spectrum_shows_each_layers_spectral_change(made, tmp_path):
    """HRA's merged weight W·H has W's singular values (δ ≈ 0); LoRA's W + BA moves them: δ as the merged
    checkpoint of ``peftlab merge`` and the base weights give it (singular values in float64)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from peftlab.commands.saved import merge

    report([made["compare"]], out=tmp_path / "page.html", spectrum=True)
    page = read_page(tmp_path / "page.html")
    assert len(page.images) == 1 + 2 + 2  # compare.png, each run's curve and spectrum
    hra = page.table("Spectral change", section="run-hra-seed-0")
    lora = page.table("Spectral change", section="run-lora-seed-0")
    assert len(hra) == len(lora) == 4 and all(float(row[1]["title"]) < 1e-5 for row in hra.values())
    base = AutoModelForSequenceClassification.from_pretrained(made["root"] / "model").state_dict()
    merged = merge(made["compare"] / "lora" / "seed-0", tmp_path / "merged").state_dict()
    for layer, row in lora.items():
        s0 = torch.linalg.svdvals(base[f"{layer}.weight"].double())
        s1 = torch.linalg.svdvals(merged[f"{layer}.weight"].double())
        want = float(torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0))
        assert want > 1e-5 and float(row[1]["title"]) == pytest.approx(want, rel=1e-4)


def test_hostile_text_is_escaped(made, tmp_path):
    folder = copy(made["run"], tmp_path / "run")
    metrics = metrics_of(folder)
    metrics["test"][HOSTILE] = 0.25
    metrics["model"] = HOSTILE
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.jsonl").write_text(json.dumps({"prompt": HOSTILE, "prediction": "a & b"}) + "\n")
    (folder / "test_items.jsonl").write_text('{"key": 0}\n{"key": 1}\n{"key": 2}\n')
    report([folder])
    html = (folder / "report.html").read_text()
    page = read_page(folder / "report.html")  # no <script> tag
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert float(page.table("Test metrics")[HOSTILE][2]["title"]) == 0.25
    assert page.table("Predictions")[HOSTILE][1]["text"] == "a & b"
    assert "test_items.jsonl (3 rows)" in "".join(page.text)


def test_a_run_without_its_curve_png_gets_one_drawn_from_the_logged_history(made, tmp_path):
    folder = copy(made["run"], tmp_path / "run")
    (folder / "training_curve.png").unlink()
    report([folder])
    page = read_page(folder / "report.html")
    assert len(page.images) == 1 and "Training curve (drawn from trainer_state.json)" in "".join(page.text)


def test_a_corrupt_image_is_shown_as_missing_with_a_warning(made, tmp_path):
    folder = copy(made["run"], tmp_path / "run")
    (folder / "training_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = report([folder])
    assert lines[0].startswith(f"warning: {folder / 'training_curve.png'}: training_curve.png is not a readable image")
    page = read_page(folder / "report.html")
    assert not page.images and "Training curve: missing (training_curve.png is not a readable image" in "".join(
        page.text)


def test_an_image_linked_from_outside_the_folder_is_not_embedded(made, tmp_path):
    """A shared folder must not make the page embed a file of the reader's: a link out of the folder is missing."""
    folder = copy(made["run"], tmp_path / "run")
    (folder / "training_curve.png").unlink()
    (folder / "training_curve.png").symlink_to(made["compare"] / "compare.png")
    lines = report([folder])
    assert "is a link to" in lines[0] and "outside the folder" in lines[0]
    page = read_page(folder / "report.html")
    assert not page.images and "Training curve: missing" in "".join(page.text)


def test_an_image_run_page_shows_before_after_and_its_sample_grid(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from conftest import tiny_sd_pipeline

    from peftlab.data import glyphs
    from peftlab.recipes.image import data as image_data

    monkeypatch.setattr(image_data, "class_cache_root", lambda: tmp_path / "class-images")
    tiny_sd_pipeline(unet_widths=(16, 32), vae_widths=(8, 16), norm_groups=8, latent_size=8,
                     image_size=16).save_pretrained(tmp_path / "sd")
    glyphs.write_subject_folder("Q", tmp_path / "subject", count=2)
    out = tmp_path / "image-run"
    assert main(["train", "--task", "subject-driven", "--model", str(tmp_path / "sd"), "--instance-data",
                 str(tmp_path / "subject"), "--instance-prompt", f"a photo of {HOSTILE} glyph", "--class-prompt",
                 "a glyph", "--method", "lora", "--num-class-images", "2", "--max-steps", "1", "--inference-steps",
                 "2", "--num-eval-images", "2", "--batch-size", "2", "--r", "2", "--output-dir", str(out)]) == 0
    report([out])
    page = read_page(out / "report.html")
    metrics = metrics_of(out)
    test = page.table("Test metrics")
    for key, value in metrics["test"].items():
        assert float(test[key][1]["title"]) == metrics["before"][key] and float(test[key][2]["title"]) == value
    assert set(page.table("Metrics not measured")) == set(metrics["skipped"])
    assert "Samples after training (image grid)" in "".join(page.text) and len(page.images) == 2
    assert f"a photo of {HOSTILE} glyph" in "".join(page.text) and HOSTILE not in (out / "report.html").read_text()


@pytest.mark.parametrize("case", ["not-a-folder", "empty", "in-progress", "bad-json", "nan", "compare-bad-json",
                                  "compare-no-rows"])
def test_bad_folders_give_one_line_errors_and_write_nothing(made, tmp_path, capsys, case):
    folder = tmp_path / case
    if case == "not-a-folder":
        folder.write_text("x")
        want = "is not a folder"
    elif case == "empty":
        folder.mkdir()
        want = "holds no metrics.json, compare.json or analysis.json"
    elif case == "in-progress":
        copy(made["run"], folder)
        (folder / "metrics.json").unlink()
        want = "metrics.json is missing; the run has not finished"
    elif case in ("bad-json", "nan"):
        copy(made["run"], folder)
        text = (folder / "metrics.json").read_text()
        (folder / "metrics.json").write_text(text[:-20] if case == "bad-json" else text.replace('"global_step": 2',
                                                                                                  '"global_step": NaN'))
        want = "metrics.json is not valid JSON" if case == "bad-json" else "metrics.json holds NaN, which is not valid"
    else:
        copy(made["compare"], folder)
        result = json.loads((folder / "compare.json").read_text())
        result["rows"] = None
        (folder / "compare.json").write_text("{" if case == "compare-bad-json" else json.dumps(result))
        want = "compare.json is not valid JSON" if case == "compare-bad-json" else "compare.json has no list of per-"
    good = copy(made["run"], tmp_path / "good")
    assert main(["report", str(good), str(folder)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftlab report: error: ") and want in lines[0], captured.err
    assert str(folder) in lines[0] and not (good / "report.html").exists()  # nothing written: all pages or none


def test_help(capsys):
    assert main(["report", "--help"]) == 0
    assert "usage: peftlab report" in capsys.readouterr().out


def test_a_comparison_with_a_diverged_runs_nan_is_shown_with_a_warning(made, tmp_path):
    """Comparisons written before files.atomic_write_json turned NaN into "nan" hold a bare NaN: the page shows it
    instead of refusing the folder."""
    folder = copy(made["compare"], tmp_path / "diverged")
    result = json.loads((folder / "compare.json").read_text())
    result["rows"][1]["mean"] = result["runs"][1]["value"] = float("nan")
    (folder / "compare.json").write_text(json.dumps(result))
    lines = report([folder])
    assert lines[0] == "warning: compare.json holds NaN (a run whose metric diverged?); shown as it is"
    page = read_page(folder / "report.html")
    assert page.table("Comparison")["lora"][2]["text"].startswith("nan ± ")
    assert page.table("Runs")["lora/seed-0"][2]["text"] == "nan"


def test_json_files_peftlab_writes_are_standard_json_even_with_a_nan(tmp_path):
    """A diverged run's NaN loss or metric reaches compare.json / metrics.json as the string "nan" (a strict
    parser refuses a bare NaN), and a tensor scalar as a plain number."""
    import torch

    from peftlab import files

    files.atomic_write_json(tmp_path / "c.json", {"rows": [{"mean": float("nan"), "std": float("inf")}],
                                                  "loss": torch.tensor(0.5), 1: (float("-inf"),)})

    def refuse(name: str) -> None:
        raise ValueError(name)

    data = json.loads((tmp_path / "c.json").read_text(), parse_constant=refuse)
    assert data == {"rows": [{"mean": "nan", "std": "inf"}], "loss": 0.5, "1": ["-inf"]}


def test_out_names_one_file_for_one_folder(made, tmp_path):
    with pytest.raises(ReportError, match="--out names one file but 2 folders"):
        report([made["run"], made["compare"]], out=tmp_path / "x.html")
    with pytest.raises(ReportError, match="is a folder"):
        report([made["run"]], out=tmp_path)


def test_chromium_renders_the_page(made, tmp_path):
    """Optional: a headless Chromium loads the page (skipped where no chromium binary is installed)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium on PATH (the html.parser tests above check the page; apt-get install chromium)")
    report([made["compare"]], out=tmp_path / "page.html")
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", (tmp_path / "page.html").as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="run-lora-seed-0"' in dom.stdout and "<img" in dom.stdout
    shot = subprocess.run([*flags, "--window-size=1200,1400", f"--screenshot={tmp_path / 'shot.png'}",
                           (tmp_path / "page.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    with Image.open(tmp_path / "shot.png") as image:  # the comparison plot is drawn: matplotlib's orange point
        pixels = np.asarray(image.convert("RGB"), dtype=np.int64)
    orange = np.abs(pixels - np.array([255, 127, 14])).sum(axis=-1) < 30
    assert orange.sum() > 20  # none where the images do not render (measured: 63 with them, 0 without)
