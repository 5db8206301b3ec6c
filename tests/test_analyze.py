"""``peftlab analyze``: the distance functions on vectors with a known answer, and the command on small
synthetic adapter folders (LoRA with A shared in distribution and B by group; HRA; bad inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftlab.cli import main
from peftlab.commands.analyze import cosine_distances, group_distances, mean_over_layers, reflection_stats

LAYERS = [f"encoder.layer.{i}.attention.self.query" for i in range(3)]


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], method: str = "lora", r: int = 2,
                  data: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"method": method, "r": r, "target_modules": ["query"]}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    if data:
        (folder / "run_config.json").write_text(json.dumps({"options": {"data": data, "method": method}}))
    return folder


def lora_runs(root: Path, d: int = 16, r: int = 2) -> list[Path]:
    """2 groups × 2 runs: A random per run (the same distribution in both groups), B = its group's direction
    plus a little noise."""
    gen = torch.Generator().manual_seed(0)
    directions = {g: torch.randn(len(LAYERS), d, r, generator=gen) for g in ("alpha", "beta")}
    folders = []
    for group in ("alpha", "beta"):
        for seed in range(2):
            tensors = {}
            for i, layer in enumerate(LAYERS):
                tensors[f"{layer}.lora_A"] = torch.randn(r, d, generator=gen)
                tensors[f"{layer}.lora_B"] = directions[group][i] + 0.05 * torch.randn(d, r, generator=gen)
            tensors["classifier.weight"] = torch.randn(2 + seed, d, generator=gen)  # modules_to_save: left out
            folders.append(write_adapter(root / f"{group}-{seed}", tensors, data=group))
    return folders


# -- pure functions -------------------------------------------------------------------------------------------------
def test_cosine_distances_of_known_vectors():
    d = cosine_distances(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
    assert torch.allclose(d, torch.tensor([[0, 0, 1, 2], [0, 0, 1, 2], [1, 1, 0, 1], [2, 2, 1, 0]], dtype=d.dtype))


def test_identical_groups_have_within_zero_and_orthogonal_groups_between_one():
    vectors = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    found = group_distances(vectors, ["a", "a", "b", "b"])
    assert found["within"] == pytest.approx(0.0, abs=1e-12)
    assert found["between"] == pytest.approx(1.0)
    assert found["ratio"] is None  # within 0: no finite ratio


def test_pairs_from_the_same_source_are_left_out():
    """HydraLoRA's B heads of one run are not compared with each other."""
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    found = group_distances(vectors, ["a", "a", "a", "a"], sources=[0, 0, 1, 1])
    assert found["within"] == pytest.approx(0.5)  # (0 + 1 + 1 + 0) / 4
    assert found["between"] is None


def test_mean_over_layers_averages_then_divides():
    per_layer = {"l0": {"within": 0.5, "between": 1.0, "ratio": 2.0}, "l1": {"within": 0.25, "between": 1.0,
                                                                                "ratio": 4.0}}
    assert mean_over_layers(per_layer) == pytest.approx({"within": 0.375, "between": 1.0, "ratio": 1.0 / 0.375})


def test_reflection_stats_of_orthogonal_and_parallel_columns():
    orthogonal = reflection_stats(torch.eye(4)[:, :2] * 3)
    assert orthogonal == pytest.approx({"mean_abs_cos": 0.0, "orthogonality": 0.0}, abs=1e-12)
    parallel = reflection_stats(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))  # û₂ = −û₁: |cos| 1, ‖I − ÛᵀÛ‖_F = √2
    assert parallel == pytest.approx({"mean_abs_cos": 1.0, "orthogonality": 2 ** 0.5})


# -- the command ----------------------------------------------------------------------------------------------------
def test_analyze_lora_separates_b_not_a(tmp_path, capsys):
    folders = lora_runs(tmp_path)
    out = tmp_path / "analysis"
    assert main(["analyze", *map(str, folders), "--out", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert (out / "analysis.png").is_file()
    assert data["method"] == "lora" and set(data["runs"].values()) == {"alpha", "beta"}  # groups from run_config
    a, b = data["factors"]["A"], data["factors"]["B"]
    assert set(a["per_layer"]) == set(LAYERS)
    assert 0.8 < a["mean"]["ratio"] < 1.25  # A: random per run, whatever the group
    assert b["mean"]["ratio"] > 10 and b["mean"]["within"] < 0.05  # B: its group's direction
    pairs = b["run_pairs"]
    assert len(pairs) == 4 and pairs[0][0] == pytest.approx(0, abs=1e-6) and pairs[0][1] < 0.05 < pairs[0][2]
    printed = capsys.readouterr().out
    assert "A: within-group" in printed and "B: within-group" in printed and "analysis.json" in printed


def test_analyze_groups_flag_overrides_and_hydralora_heads(tmp_path):
    gen = torch.Generator().manual_seed(1)
    folders = []
    for name in ("x", "y", "z"):
        tensors = {f"{layer}.lora_A": torch.randn(2, 8, generator=gen) for layer in LAYERS[:2]}
        tensors |= {f"{layer}.lora_B": torch.randn(3, 8, 2, generator=gen) for layer in LAYERS[:2]}
        tensors |= {f"{layer}.router.weight": torch.randn(3, 8, generator=gen) for layer in LAYERS[:2]}
        folders.append(str(write_adapter(tmp_path / name, tensors, method="hydralora")))
    out = tmp_path / "out"
    assert main(["analyze", *folders, "--groups", "g1,g1,g2", "--out", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert list(data["runs"].values()) == ["g1", "g1", "g2"]
    assert set(data["factors"]) == {"A", "B"}
    assert data["factors"]["B"]["mean"]["between"] is not None


def test_analyze_hra_reports_reflection_geometry(tmp_path, capsys):
    gen = torch.Generator().manual_seed(2)
    folders = []
    for name in ("h0", "h1"):
        tensors = {f"{layer}.hra_u": torch.randn(16, 4, generator=gen) for layer in LAYERS}
        folders.append(str(write_adapter(tmp_path / name, tensors, method="hra", r=4, data="tweets")))
    out = tmp_path / "out"
    assert main(["analyze", *folders, "--out", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["method"] == "hra" and "factors" not in data
    run = data["reflections"][folders[0]]
    assert run["group"] == "tweets" and set(run["per_layer"]) == set(LAYERS)
    assert 0 < run["mean"]["mean_abs_cos"] < 1 and run["mean"]["orthogonality"] > 0
    assert (out / "analysis.png").is_file()
    assert "‖I − ÛᵀÛ‖_F" in capsys.readouterr().out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("peftlab analyze: error:"), err
    return err


def test_analyze_bad_inputs(tmp_path, capsys):
    folders = [str(f) for f in lora_runs(tmp_path)]
    out = str(tmp_path / "out")
    assert main(["analyze", folders[0], "--out", out]) == 2
    assert "at least 2" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["analyze", folders[0], str(empty), "--out", out]) == 2
    assert "holds no adapter" in one_error_line(capsys)
    assert main(["analyze", folders[0], str(tmp_path / "missing"), "--out", out]) == 2
    assert "not a folder" in one_error_line(capsys)
    hra = write_adapter(tmp_path / "hra", {f"{LAYERS[0]}.hra_u": torch.randn(16, 2)}, method="hra")
    assert main(["analyze", folders[0], str(hra), "--out", out]) == 2
    assert "one method" in one_error_line(capsys)
    wide = write_adapter(tmp_path / "wide", {f"{LAYERS[0]}.lora_A": torch.randn(4, 16),
                                             f"{LAYERS[0]}.lora_B": torch.randn(16, 4)})
    assert main(["analyze", folders[0], str(wide), "--out", out]) == 2
    assert "same shape" in one_error_line(capsys)
    assert main(["analyze", *folders[:2], "--groups", "a,b,c", "--out", out]) == 2
    assert "one per run" in one_error_line(capsys)


def test_analyze_never_overwrites_an_earlier_analysis_without_overwrite(tmp_path, capsys):
    folders = [str(f) for f in lora_runs(tmp_path)]
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "analysis.json").write_text('{"earlier": true}')
    assert main(["analyze", *folders, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "already holds analysis.json" in err and "--overwrite" in err
    assert json.loads((out / "analysis.json").read_text()) == {"earlier": True} and not (out / "analysis.png").exists()
    assert main(["analyze", *folders, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "analysis.json").read_text())["method"] == "lora"
