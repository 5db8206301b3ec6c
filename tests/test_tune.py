"""``peftlab compare --tune``: the search on validation, the chosen setting scored on test, pruning, resuming.

The classification searches train HRA on the tiny BERT of ``test_cli`` (300 keyword rows, 12 steps, evaluation every
4): its 3-point grid (lr 1e-3, 1e-2, 1e-1) scores 0.5 / 0.87 / 0.73 on validation, so the middle one must be chosen.
The killed search runs in a process of its own that SIGKILLs itself as trial 1 starts (before its run_config.json).
Every other task runs a 2-point grid on its tiny model (causal-lm and data-to-text: the GPT-2 of ``test_recipes``,
whose scores tie at 0, so the lower validation loss decides; subject-driven: the Stable Diffusion of ``conftest``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_classifier, write_keyword_csv

from peftlab.cli import main

optuna = pytest.importorskip("optuna")

from peftlab.commands import tune as tuning  # noqa: E402  (after the optuna check)
from peftlab.recipes.options import RunOptions  # noqa: E402

GRID = [1e-3, 1e-2, 1e-1]  # hra's default 1e-2 / 10, x 1, x 10


def search_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", "--model", str(root / "model"), "--data", str(root / "kw.csv"), "--methods", "hra",
            "--seeds", "1", "--tune", "lr", "--trials", "3", "--max-steps", "12", "--eval-steps", "4",
            "--batch-size", "16", "--no-initial-eval", "--report-to", "none", "--output-dir", str(out), *extra]


def run_main(argv: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


def read_trials(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    save_tiny_classifier(root / "model")
    write_keyword_csv(root / "kw.csv", 300)
    return root


@pytest.fixture(scope="module")
def searched(assets) -> tuple[Path, str]:
    """An uninterrupted grid search (and its final run): (folder, stdout)."""
    out = assets / "search"
    code, stdout = run_main(search_args(assets, out))
    assert code == 0
    return out, stdout


# -- (a) the grid search picks the best validation score; the test split is read only by the final runs ------------
def test_grid_search_picks_the_best_validation_lr_and_reads_test_only_in_the_final_run(searched):
    out, stdout = searched
    rows = read_trials(out)
    assert [float(r["lr"]) for r in rows] == GRID and {r["state"] for r in rows} == {"complete"}
    scores = [float(r["validation_score"]) for r in rows]
    assert len(set(scores)) == 3  # the data tell the settings apart
    best = GRID[scores.index(max(scores))]
    result = json.loads((out / "compare.json").read_text())
    assert result["tuned"]["hra"]["lr"] == best and result["rows"][0]["lr"] == best
    # the final run (seed 0) is the chosen trial trained again: the same best validation score, then scored on test
    final = json.loads((out / "hra" / "seed-0" / "metrics.json").read_text())
    assert final["best_validation_metric"] == pytest.approx(max(scores), abs=1e-9) and "accuracy" in final["test"]
    for k in range(3):  # every trial was scored on validation, none on test
        trial = json.loads((out / "trials" / "hra" / str(k) / "metrics.json").read_text())
        assert "validation" in trial and "test" not in trial and "initial_test" not in trial
        assert not list((out / "trials" / "hra" / str(k)).glob("checkpoint-*"))
    assert stdout.count("validation accuracy after training") == 3 and stdout.count("test accuracy after training") == 1
    assert stdout.index("test accuracy after training") > stdout.rindex("validation accuracy after training")
    md = (out / "compare.md").read_text()
    assert "Tuned (lr) on the validation split" in md
    assert f"| hra | {best:.3g} | - | accuracy {max(scores):.4f} | 3 (0) |" in md
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"


# -- (b) TPE: the same seed proposes the same settings, also across a kill ----------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL in the middle of a trial (not an Exception: the trial is left running)."""


def fake_train(seen: list[float], kill_at: int | None = None):
    def train(options: RunOptions) -> dict:
        seen.append(options.lr)
        if kill_at is not None and len(seen) == kill_at:
            raise Killed
        return {"metric": "accuracy", "validation": {"accuracy": -abs(options.lr - 0.02)}, "global_step": 3}

    return train


def tpe_search(tmp_path, monkeypatch, seed: int, name: str, kill_at: int | None = None) -> list[float]:
    seen: list[float] = []
    monkeypatch.setattr(tuning, "train", fake_train(seen, kill_at))
    monkeypatch.setattr(tuning.gc, "collect", lambda: 0)  # 1 s per trial in a large process; nothing to free here
    storage = tuning.journal(tmp_path / f"{name}.journal")
    options = RunOptions(method="lora", seed=seed, output_dir=str(tmp_path / name))
    space = tuning.search_space(options, "lora", ("lr", "r"))
    with contextlib.suppress(Killed):
        tuning.run_search(options, "lora", space, 7, storage, tmp_path / name)
    if kill_at is not None:  # resumed: the killed trial runs again, then the rest
        rows = tuning.run_search(options, "lora", space, 7, storage, tmp_path / name)
        assert [r["lr"] for r in rows] == seen[:kill_at - 1] + seen[kill_at:]
        return seen[:kill_at - 1] + seen[kill_at:]
    return seen


def test_tpe_proposals_follow_the_seed_and_survive_a_kill(tmp_path, monkeypatch):
    first = tpe_search(tmp_path, monkeypatch, 0, "a")
    assert len(set(first)) == 7 and all(3e-4 <= lr <= 3e-2 for lr in first)  # 7 different proposals in range
    assert tpe_search(tmp_path, monkeypatch, 0, "b") == first
    assert tpe_search(tmp_path, monkeypatch, 1, "c") != first
    resumed = tpe_search(tmp_path, monkeypatch, 0, "d", kill_at=3)
    assert resumed == first


def test_ties_go_to_the_best_training_evaluation_then_the_earliest_trial():
    def row(k: int, score: float, loss: float | None) -> dict:
        return {"method": "lora", "trial": k, "lr": 1e-3 * (k + 1), "r": None, "metric": "exact_match",
                "validation_score": score, "state": "complete", "eval_metric": "loss", "best_eval": loss}

    assert tuning.best_row([row(0, 0.0, 2.0), row(1, 0.0, 1.5), row(2, 0.0, 1.7)])["trial"] == 1  # lowest loss
    assert tuning.best_row([row(0, 0.0, 2.0), row(1, 0.5, 3.0)])["trial"] == 1  # the score comes first
    assert tuning.best_row([row(0, 0.0, None), row(1, 0.0, None)])["trial"] == 0  # image tasks: the earliest
    assert tuning.best_row([{**row(0, 0.0, 1.0), "state": "pruned"}, row(1, 0.0, 2.0)])["trial"] == 1


# -- (c) a trial whose validation scores are below the median of the complete ones is pruned --------------------------
def test_a_trial_below_the_median_is_pruned(assets, tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    storage = tuning.journal(tmp_path / "prune.journal")
    study = optuna.create_study(study_name="hra", storage=storage, direction="maximize")
    for k in range(2):  # two complete trials that scored 1.5 (more than any accuracy) at every evaluation
        study.add_trial(create_trial(
            params={"lr": 1e-2}, distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)}, value=1.5,
            intermediate_values={step: 1.5 for step in range(1, 13)}, state=TrialState.COMPLETE,
            user_attrs={"k": k, "metric": "accuracy", "score": 1.5, "steps": 12, "seconds": 1.0}))
    options = RunOptions(model=str(assets / "model"), data=str(assets / "kw.csv"), method="hra", max_steps=12,
                         eval_steps=4, batch_size=16, initial_eval=False, report_to="none")
    space = tuning.search_space(options, "hra", ("lr",))
    rows = tuning.run_search(options, "hra", space, 3, storage, tmp_path / "trials")
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert rows[2]["steps"] == 4 and rows[2]["validation_score"] is None  # stopped at its first evaluation
    assert not (tmp_path / "trials" / "2").exists()


# -- (d) a killed search resumes from its finished trials and ends as the uninterrupted one ---------------------------
RUNNER = """
import json, os, signal, sys
from pathlib import Path

from peftlab.cli import main

out, argv = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2])
replace = os.replace


def killing_replace(first, second, *args, **kwargs):
    if Path(second).resolve() == out / "trials" / "hra" / "1" / "run_config.json":  # trial 1 has started
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(first, second, *args, **kwargs)


os.replace = killing_replace
sys.exit(main(argv))
"""


def test_a_killed_search_resumes_from_its_finished_trials(assets, searched):
    out = assets / "killed"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(out), json.dumps(search_args(assets, out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    first = out / "trials" / "hra" / "0" / "metrics.json"
    assert first.is_file() and not (out / "trials" / "hra" / "1" / "run_config.json").exists()
    stamp = first.stat().st_mtime_ns
    code, stdout = run_main(search_args(assets, out, "--resume"))
    assert code == 0
    assert "trial 1 was running when the search stopped" in stdout
    assert "trial 1/3" not in stdout and "trial 2/3" in stdout and "trial 3/3" in stdout
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again
    assert without_seconds(read_trials(out)) == without_seconds(read_trials(searched[0]))
    tuned = json.loads((out / "compare.json").read_text())["tuned"]["hra"]
    assert tuned["lr"] == json.loads((searched[0] / "compare.json").read_text())["tuned"]["hra"]["lr"]
    again, stdout = run_main(search_args(assets, out, "--resume"))  # finished: nothing runs again
    assert again == 0 and "nothing to resume" in stdout and "trial" not in stdout.replace("nothing to resume", "")


def without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# -- (e) an image task: 2 trials on validation samples, the chosen one scored on test ---------------------------------
def test_tune_runs_an_image_task(tmp_path, tiny_sd_dir):
    pytest.importorskip("diffusers")
    pytest.importorskip("skimage")
    from test_image_recipes import FAST, write_digits

    write_digits(tmp_path / "digits")
    out = tmp_path / "cmp"
    code, _ = run_main(["compare", "--task", "controllable", "--model", str(tiny_sd_dir), "--data",
                        str(tmp_path / "digits"), "--control", "canny", "--methods", "lora", "--seeds", "1",
                        "--tune", "lr", "--trials", "2", "--max-steps", "2", "--report-to", "none",
                        "--output-dir", str(out), *FAST])
    assert code == 0
    rows = read_trials(out)
    assert [float(r["lr"]) for r in rows] == [3e-4, 3e-2] and {r["metric"] for r in rows} == {"edge_f1"}
    trial = json.loads((out / "trials" / "lora" / "0" / "metrics.json").read_text())
    final = json.loads((out / "lora" / "seed-0" / "metrics.json").read_text())
    assert "validation" in trial and "test" not in trial and "test" in final and "validation" not in final
    assert trial["before"] != final["before"]  # other held-out examples and noise seeds than the test score's
    assert "| lora |" in (out / "compare.md").read_text().split("Tuned (lr)")[1]


# -- (f) bad input: one line, exit 2, no folder ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--tune", "lr,depth"], "--tune: unknown key(s) ['depth']"),
    (["--tune", "r"], "search the learning rate"),
    (["--tune", "lr", "--trials", "0"], "--trials must be a positive integer"),
    (["--tune", "lr", "--lrs", "hra=1e-3"], "--lrs fixes the learning rate of hra"),
    (["--tune", "lr", "--lr", "1e-3"], "--lr fixes every method's learning rate"),
    (["--tune", "lr,r", "--r", "4"], "--r fixes the rank"),
    (["--trials", "3"], "--trials belongs to a --tune search"),
    (["--tune", "lr", "--resume"], "holds no `compare --tune` search"),
])
def test_bad_tune_requests_are_one_line_errors(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    argv = ["compare", "--model", str(assets / "model"), "--data", str(assets / "kw.csv"), "--methods", "hra",
            "--output-dir", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftlab compare: error: ") and message in err
    assert not out.exists()


# -- (g) the other tasks: a 2-point grid on a tiny model, trials scored on validation, the chosen lr on test ---------
def expected_choice(rows: list[dict[str, str]], lower_is_better: bool = False) -> dict[str, str]:
    """The trial the search must choose, worked out here: the best validation score in the metric's direction; on
    ties the lowest best validation loss the Trainer saw (text tasks), then the earliest."""
    def key(row: dict[str, str]) -> tuple[float, float, int]:
        score = float(row["validation_score"])
        loss = float(row["best_eval"]) if row["best_eval"] else float("inf")
        return (-score if lower_is_better else score), -loss, -int(row["trial"])

    return max(rows, key=key)


def check_tuned_search(out: Path, method: str, grid: list[float], metric: str) -> dict[str, str]:
    """What every task's search must leave: one trials.csv row per grid lr with the task's metric, trial folders
    scored on validation only, the chosen trial's lr in compare.json, the final seed-0 run scored on test, and the
    Tuned row in compare.md. Returns the chosen row."""
    rows = read_trials(out)
    assert [float(r["lr"]) for r in rows] == grid and {r["state"] for r in rows} == {"complete"}
    assert {r["metric"] for r in rows} == {metric}
    for k, row in enumerate(rows):
        trial = json.loads((out / "trials" / method / str(k) / "metrics.json").read_text())
        assert trial["metric"] == metric and "test" not in trial and "initial_test" not in trial
        assert trial["validation"][metric] == pytest.approx(float(row["validation_score"]), abs=1e-9)
    chosen = expected_choice(rows)
    result = json.loads((out / "compare.json").read_text())
    assert result["tuned"][method]["lr"] == float(chosen["lr"]) and result["rows"][0]["lr"] == float(chosen["lr"])
    assert result["metric"] == metric
    final = json.loads((out / method / "seed-0" / "metrics.json").read_text())
    assert final["metric"] == metric and metric in final["test"] and "validation" not in final
    assert result["runs"][0]["value"] == final["test"][metric]
    tuned = (out / "compare.md").read_text().split("Tuned (lr) on the validation split")[1]
    assert f"| {method} | {float(chosen['lr']):.3g} | - | {metric} {float(chosen['validation_score']):.4f} | 2 (0) |" \
        in tuned
    return chosen


def lm_search_args(model: Path, data: Path, out: Path, task: str, method: str, *extra: str) -> list[str]:
    return ["compare", "--task", task, "--model", str(model), "--data", str(data), "--methods", method, "--seeds", "1",
            "--tune", "lr", "--trials", "2", "--max-steps", "4", "--eval-steps", "2", "--batch-size", "8",
            "--max-test-samples", "3", "--max-new-tokens", "6", "--report-to", "none",
            "--output-dir", str(out), *extra]


def check_loss_tie_break(out: Path, method: str, chosen: dict[str, str]) -> None:
    """Causal-lm / data-to-text: the Trainer's evaluations are the validation loss (lower is better); each trial's
    ``best_eval`` is the lowest eval_loss of its trainer_state.json, and a tie on the score goes to the lower one."""
    rows = read_trials(out)
    for k, row in enumerate(rows):
        assert row["eval_metric"] == "loss"
        state = json.loads((out / "trials" / method / str(k) / "trainer_state.json").read_text())
        losses = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
        assert len(losses) == 2 and float(row["best_eval"]) == pytest.approx(min(losses), rel=1e-6)
    if rows[0]["validation_score"] == rows[1]["validation_score"]:  # the tiny LMs usually tie (score 0)
        assert float(rows[0]["best_eval"]) != float(rows[1]["best_eval"])
        assert chosen["trial"] == min(rows, key=lambda r: float(r["best_eval"]))["trial"]


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory) -> Path:
    from test_recipes import tiny_lm

    return tiny_lm.__wrapped__(tmp_path_factory)


def test_tune_runs_causal_lm(tiny_causal_lm, tmp_path):
    from test_recipes import write_instructions

    out = tmp_path / "cmp"
    data = write_instructions(tmp_path / "train.jsonl")
    code, _ = run_main(lm_search_args(tiny_causal_lm, data, out, "causal-lm", "hra", "--no-initial-eval"))
    assert code == 0
    chosen = check_tuned_search(out, "hra", [1e-3, 1e-1], "exact_match")
    check_loss_tie_break(out, "hra", chosen)
    final = json.loads((out / "hra" / "seed-0" / "metrics.json").read_text())
    assert final["num_test"] == 3 and "exact_match_by_task" in final["test"]


def test_tune_runs_data_to_text(tiny_causal_lm, tmp_path):
    from peftlab.data import generate_e2e

    pairs = generate_e2e(30, seed=3)
    data = tmp_path / "e2e.txt"
    data.write_text("".join(f"{mr} || {ref}\n" for mr, ref in zip(pairs["mr"], pairs["ref"], strict=True)))
    out = tmp_path / "cmp"
    code, _ = run_main(lm_search_args(tiny_causal_lm, data, out, "data-to-text", "lora"))
    assert code == 0
    chosen = check_tuned_search(out, "lora", [3e-4, 3e-2], "bleu")
    check_loss_tie_break(out, "lora", chosen)


def test_tune_runs_subject_driven(tmp_path, tiny_sd_dir, monkeypatch):
    pytest.importorskip("diffusers")
    from conftest import FAST_IMAGE_ARGS

    from peftlab.data import glyphs
    from peftlab.recipes.image import data as image_data

    monkeypatch.setattr(image_data, "class_cache_root", lambda: tmp_path / "class-images")
    glyphs.write_subject_folder("Q", tmp_path / "subject", count=3)
    out = tmp_path / "cmp"
    code, _ = run_main(["compare", "--task", "subject-driven", "--model", str(tiny_sd_dir),
                        "--instance-data", str(tmp_path / "subject"), "--instance-prompt", "a photo of sks glyph",
                        "--class-prompt", "a photo of a glyph", "--num-class-images", "2", "--methods", "lora",
                        "--seeds", "1", "--tune", "lr", "--trials", "2", "--max-steps", "2", "--report-to", "none",
                        "--output-dir", str(out), *FAST_IMAGE_ARGS])
    assert code == 0
    check_tuned_search(out, "lora", [3e-4, 3e-2], "subject_similarity")
    trial = json.loads((out / "trials" / "lora" / "0" / "metrics.json").read_text())
    final = json.loads((out / "lora" / "seed-0" / "metrics.json").read_text())
    assert trial["before"] != final["before"]  # other noise seeds than the test score's
