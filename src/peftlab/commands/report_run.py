"""``peftlab report``: the section of one ``peftlab train`` run, and reading a result folder's files.

A run folder holds ``metrics.json`` (+ ``run_config.json``, ``training_curve.png``, the trainer's
``trainer_state.json``, ``predictions.jsonl`` of generation tasks, ``samples.png`` of image tasks, and any other
PNG, e.g. a spectrum plot); see :mod:`peftlab.commands.report`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from peftlab.commands.report_page import MISSING, Cell, Figure, Section, Table, cell
from peftlab.errors import ReportError
from peftlab.recipes.test_items import ITEMS_FILE

PREDICTIONS_SHOWN = 20
FOLD_ROWS = 30
KNOWN_JSON = {"metrics.json", "run_config.json", "trainer_state.json", "adapter_config.json", "pipeline.json",
              "config.json", "model_index.json", "generation_config.json", "compare.json", "analysis.json"}


# -- reading files ---------------------------------------------------------------------------------------------------
def read_result(path: Path, how_to_fix: str, section: Section | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; ReportError (naming the file and ``how_to_fix``) if it is missing, not valid JSON,
    or not an object. NaN / Infinity (not JSON, though Python writes it) is refused too, unless ``section`` is given:
    then it is read as a float, with a warning on the section (``compare.json`` holds a diverged run's NaN)."""
    found: list[str] = []

    def refuse(constant: str) -> float:
        if section is None:
            raise ReportError(f"{path} holds {constant}, which is not valid JSON (the file is corrupt or was edited); "
                              f"{how_to_fix}")
        if not found:
            section.warnings.append(f"{path.name} holds {constant} (a run whose metric diverged?); shown as it is")
        found.append(constant)
        return float(constant)

    if not path.is_file():
        raise ReportError(f"{path} is missing; {how_to_fix}")
    try:
        data = json.loads(path.read_bytes(), parse_constant=refuse)
    except (ValueError, RecursionError) as err:
        raise ReportError(f"{path} is not valid JSON ({' '.join(str(err).split())[:120]}); {how_to_fix}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} should hold a JSON object, found {type(data).__name__}; {how_to_fix}")
    return data


def read_optional(path: Path, section: Section | None = None) -> Any:
    """A side file's JSON (``run_config.json``, ``trainer_state.json``), or ``None`` (with a warning on ``section``)
    when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        if section is not None:
            section.warnings.append(f"{path.name} is not valid JSON; what it holds is left out")
        return None


def figure(path: Path, title: str, section: Section) -> Figure | None:
    """The image at ``path`` as an embedded PNG (other formats converted); ``None`` if there is no such file. An
    unreadable image, or a link to a file outside the folder (a shared folder must not make the page embed the
    reader's own files), is kept as missing, with a warning on ``section``."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return None
    if path.is_symlink() and not path.resolve().is_relative_to(path.parent.resolve()):
        why = f"{path.name} is a link to {path.resolve()}, outside the folder"
        section.warnings.append(f"{path}: {why}; it is shown as missing (copy the file into the folder)")
        return Figure(title, missing=why)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width = image.width
            if image.format != "PNG":
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
        return Figure(title, data, width=width)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        why = f"{path.name} is not a readable image: {' '.join(str(err).split())[:120]}"
        section.warnings.append(f"{path}: {why}; it is shown as missing (rewrite the file, or rerun the command)")
        return Figure(title, missing=why)


def grouped_metric(key: str) -> str | None:
    """The metric of a per-group score ``<metric>_by_<group>`` (``"accuracy_by_domain"`` → ``"accuracy"``), else
    ``None``."""
    metric, sep, group = key.rpartition("_by_")
    return metric if sep and metric and group else None


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``outer/inner`` keys; a per-group score is named by its metric: ``{"accuracy_by_domain":
    {"movie": 0.8}, "skipped": {"cider": "why"}}`` → ``{"accuracy/movie": 0.8, "skipped/cider": "why"}`` (what
    ``compare`` and ``report`` both show)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{grouped_metric(key) or key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- a training run ------------------------------------------------------------------------------------------------
def run_section(folder: Path, title: str, section_id: str, spectrum: bool = False) -> Section:
    """A ``peftlab train`` run: options, metrics, evaluations, curve, image grid, predictions, other figures; with
    ``spectrum``, the spectral change of every adapted layer (:func:`add_spectrum`)."""
    metrics = read_result(folder / "metrics.json", "the run has not finished or is damaged: wait for peftlab train to "
                          "finish, or rerun it with --overwrite")
    section = Section(section_id, title, "peftlab train run")
    run = read_optional(folder / "run_config.json", section)
    options = run.get("options", {}) if isinstance(run, dict) and isinstance(run.get("options"), dict) else {}
    section.facts = run_facts(metrics, options)
    before = metrics.get("initial_test") or metrics.get("before")
    test = metrics.get("test")
    if isinstance(test, dict):
        after, earlier = flat(test), flat(before) if isinstance(before, dict) else {}
        columns = ["metric", "before training", "after training"] if earlier else ["metric", "test"]
        rows = [[Cell(k), *([cell(earlier.get(k))] if earlier else []), cell(v)] for k, v in after.items()]
        section.tables.append(Table(f"Test metrics ({metrics.get('num_test', MISSING)} examples)"
                                    if "num_test" in metrics else "Test metrics", columns, rows))
    if isinstance(metrics.get("skipped"), dict):
        section.tables.append(Table("Metrics not measured", ["metric", "why"],
                                    [[Cell(k), cell(v)] for k, v in metrics["skipped"].items()]))
    state = read_optional(folder / "trainer_state.json", section)
    history = state.get("log_history", []) if isinstance(state, dict) else []
    evaluations = validation_table(history if isinstance(history, list) else [])
    if evaluations:
        section.tables.append(evaluations)
    predictions = predictions_table(folder / "predictions.jsonl", section)
    if predictions:
        section.tables.append(predictions)
    section.tables += extra_json_tables(folder)
    if (folder / ITEMS_FILE).is_file():
        with open(folder / ITEMS_FILE, "rb") as f:
            section.facts.append(("per-example test scores", cell(f"{ITEMS_FILE} ({sum(1 for _ in f):,} rows)")))
    known = {"training_curve.png": "Training curve", "samples.png": "Samples after training (image grid)"}
    curve = figure(folder / "training_curve.png", known["training_curve.png"], section) or drawn_curve(history, metrics)
    samples = figure(folder / "samples.png", known["samples.png"], section)
    others = (figure(path, path.name, section) for path in sorted(folder.glob("*.png")) if path.name not in known)
    section.figures += [f for f in (curve, samples, *others) if f is not None]
    if spectrum:
        add_spectrum(folder, section)
    return section


def run_facts(metrics: dict[str, Any], options: dict[str, Any]) -> list[tuple[str, Cell]]:
    """The run's options and costs, as (name, value) pairs."""
    def pick(*keys: str) -> Any:
        for key in keys:
            if metrics.get(key) is not None:
                return metrics[key]
            if options.get(key) is not None:
                return options[key]
        return None

    facts: dict[str, Any] = {
        "task": pick("task"), "model": pick("model"), "data": pick("data", "instance_data"),
        "control": pick("control"), "instance prompt": pick("instance_prompt"), "class prompt": pick("class_prompt"),
        "method": pick("method"), "r": options.get("r"), "method options": options.get("adapter_args") or None,
        "learning rate": pick("lr"), "seed": options.get("seed"), "batch size": options.get("batch_size"),
        "budget": (f"{options['max_steps']} steps" if options.get("max_steps") else
                   f"{options['epochs']} epochs" if options.get("epochs") is not None else None),
        "steps trained": pick("global_step"), "train / validation / test examples": (
            "/".join(str(metrics.get(k, MISSING)) for k in ("num_train", "num_validation", "num_test"))
            if "num_train" in metrics else None),
        "main metric": pick("metric"), f"best validation {metrics.get('metric', 'metric')}":
            metrics.get("best_validation_metric"), "final training loss": pick("train_loss", "final_loss"),
    }
    trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
    if isinstance(trainable, int) and isinstance(total, int) and total > 0:
        facts["trainable parameters"] = f"{trainable:,} of {total:,} ({100 * trainable / total:.3f} %)"
    facts["seconds per step"] = metrics.get("seconds_per_step")
    if metrics.get("peak_memory_mb") is not None:
        facts["peak memory"] = f"{metrics['peak_memory_mb']:,.0f} MB ({metrics.get('peak_memory_kind', '?')})"
    return [(name, cell(value)) for name, value in facts.items() if value is not None]


def validation_table(history: list[Any]) -> Table | None:
    """The evaluations HF Trainer logged during training (``eval_*`` entries of its log history), one row per step."""
    skip = ("runtime", "per_second", "preparation_time")
    entries = [e for e in history if isinstance(e, dict) and any(str(k).startswith("eval_") for k in e)]
    keys = list(dict.fromkeys(k for e in entries for k in e if k.startswith("eval_") and not k.endswith(skip)))
    if not entries or not keys:
        return None
    rows = [[cell(e.get("step")), *(cell(e.get(k)) for k in keys)] for e in entries]
    return Table("Validation during training", ["step", *(k.removeprefix("eval_") for k in keys)], rows,
                 folded=len(rows) > FOLD_ROWS)


def drawn_curve(history: list[Any], metrics: dict[str, Any]) -> Figure | None:
    """The training curve drawn from the logged history, for a run without ``training_curve.png``."""
    from peftlab.recipes.training import plot_training_curve, pyplot

    entries = [e for e in history if isinstance(e, dict)]
    if not any("loss" in e for e in entries) or pyplot() is None:
        return None
    buffer = io.BytesIO()
    plot_training_curve(entries, buffer, str(metrics.get("metric", "loss")))  # savefig takes a file object
    return Figure("Training curve (drawn from trainer_state.json)", buffer.getvalue())


def predictions_table(path: Path, section: Section) -> Table | None:
    """The first rows of ``predictions.jsonl`` (prompt, prediction, reference, ...), folded."""
    if not path.is_file():
        return None
    rows: list[dict[str, Any]] = []
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            total += 1
            if len(rows) < PREDICTIONS_SHOWN:
                try:
                    row = json.loads(line)
                except ValueError:
                    section.warnings.append(f"{path.name} line {total} is not valid JSON; left out")
                    continue
                rows.append(row if isinstance(row, dict) else {"value": row})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    body = [[cell(r.get(k)) for k in keys] for r in rows]
    return Table(f"Predictions (first {len(rows)} of {total}, predictions.jsonl)", keys, body, folded=True)


def extra_json_tables(folder: Path) -> list[Table]:
    """Other result files beside the run (e.g. a benchmark's ``forgetting.json``): JSON objects of numbers only."""
    tables = []
    for path in sorted(folder.glob("*.json")):
        if path.name in KNOWN_JSON or path.name.startswith("tokenizer") or path.name.endswith("_map.json"):
            continue
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError, OSError):
            continue
        numbers = flat(data) if isinstance(data, dict) else {}
        if numbers and all(isinstance(v, (int, float)) for v in numbers.values()):
            tables.append(Table(path.name, ["key", "value"], [[Cell(k), cell(v)] for k, v in numbers.items()]))
    return tables


def add_spectrum(folder: Path, section: Section) -> None:
    """The relative spectral change δ = ‖σ(W') − σ(W)‖₂ / ‖σ(W)‖₂ of every adapted layer's merged weight W'
    (:mod:`peftlab.spectrum`; HydraLoRA merged with uniform head weights), as a table and a bar chart. The run's
    adapter is loaded on its base model; a run without a text adapter (full fine-tuning, a linear probe, an image
    run's pipeline) gets a note instead."""
    from peftlab.commands.saved import is_pipeline_dir, load_for_inference
    from peftlab.recipes.rundir import is_adapter_dir
    from peftlab.recipes.training import pyplot
    from peftlab.spectrum import spectral_changes

    if not is_adapter_dir(folder) or is_pipeline_dir(folder):
        section.warnings.append(f"no spectrum for {folder}: it holds no text-model adapter (adapter_config.json)")
        return
    model, _ = load_for_inference(folder, None)
    adapter = next((a for _, a in model._active_adapters()), None)
    deltas = spectral_changes(model, **(adapter.example_merge_options() if adapter else {}))
    section.tables.append(Table("Spectral change per adapted layer", ["layer", "δ"],
                                [[Cell(k), cell(v)] for k, v in deltas.items()], folded=True,
                                note="δ = ‖σ(W′) − σ(W)‖₂ / ‖σ(W)‖₂ of the merged weight W′ (σ: singular values)"))
    plt = pyplot()
    if plt is None or not deltas:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(deltas)), 3.5))
    ax.bar(range(len(deltas)), list(deltas.values()))
    values = list(deltas.values())
    ax.set(xlabel="adapted layer (in model order)", ylabel="δ", title=f"spectral change of the merged weights: "
           f"mean {sum(values) / len(values):.3g}, max {max(values):.3g}")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    section.figures.append(Figure("Spectral change per adapted layer", buffer.getvalue()))
