"""Hostile input to the CLI commands other than ``serve``: each case is one ``peftlab <command>: error: ...`` line
with exit code 2, found before any run folder or output is written, or the behaviour a user expects."""

from __future__ import annotations

import json

import pytest
from test_recipes import tiny_lm  # noqa: F401  (the module-scoped fixture)

from peftlab.cli import main


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"peftlab {command}: error:"), err
    return err


# -- 5: data-to-text on a file whose inputs have no triple ------------------------------------------------------------
def test_data_to_text_without_any_triple_is_a_data_error_before_the_run_folder(tiny_lm, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "dart.json"
    data.write_text(json.dumps([{"tripleset": [], "annotations": [{"source": "x", "text": f"text {i}"}]}
                                for i in range(20)]))
    out = tmp_path / "run"
    args = ["train", "--task", "data-to-text", "--model", str(tiny_lm), "--data", str(data), "--method", "lora",
            "--max-steps", "1", "--output-dir", str(out)]
    assert main(args) == 2
    err = one_error_line(capsys, "train")
    assert "no DART input with a triple and a reference" in err
    assert not out.exists()  # no run_config.json left to block the next run
    data.write_text(json.dumps([{"tripleset": [["a", "p", "b"]], "annotations": [{"source": "x", "text": "a p b"}]}]))
    assert main(args) == 2
    assert "1 distinct input(s)" in one_error_line(capsys, "train") and not out.exists()
