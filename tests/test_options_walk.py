"""Every option of ``RunOptions``, for every task, changes what the run runs -- or is refused.

For each task the default run's plan (:func:`peftlab.recipes.plan.plan`: what the recipe builds before
training, through the recipe's own setup functions) is compared with the plan of the run with one option
changed. An option the task does not use must be a one-line RecipeError naming the option and the tasks that use
it; an option it uses must change the plan. The few options that by nature leave the computation alone are listed
in ``NOT_COMPUTATION`` with the reason. Models, data and pipelines are loaded once (cached copies); nothing trains.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil

import pytest
from conftest import save_tiny_classifier, save_tiny_lm, tiny_sd_pipeline

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab.errors import RecipeError
from peftlab.recipes import plan as planning
from peftlab.recipes.options import TASKS, RunOptions

pytest.importorskip("diffusers")
pytest.importorskip("bitsandbytes")

NOT_COMPUTATION = {
    "task": "selects the recipe: the walk runs every task",
    "output_dir": "where the run is written",
    "resume": "continues the run in --output-dir where it stopped (tests/test_rundir.py, test_faults.py)",
    "overwrite": "allows replacing an earlier run in --output-dir",
    "report_to": "where the logs go (tests/test_tracking.py)",
}
VALUES = {  # a value other than the default, valid for every task that uses the option
    "text_column": "other", "label_column": "label2", "num_labels": 3, "glue_task": "cola", "max_length": 8,
    "max_train_samples": 4, "max_eval_samples": 3, "max_test_samples": 1, "split_seed": 1, "method": "lora", "r": 2,
    "adapter_args": {"orthogonality_weight": 0.5}, "lr": 1e-3, "epochs": 2.0, "max_steps": 3, "batch_size": 3,
    "eval_batch_size": 5, "eval_steps": 1, "warmup": 0.5, "weight_decay": 0.1, "label_smoothing": 0.1, "seed": 1,
    "initial_eval": False, "keep_checkpoints": False, "mixed_precision": "bf16", "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True, "torch_dtype": "bfloat16", "load_in_4bit": True, "load_in_8bit": True,
    "torch_compile": True, "instance_data": "glyph:Q", "instance_prompt": "a photo of sks glyph",
    "class_prompt": "a glyph", "prior_loss_weight": 0.5, "num_class_images": 2, "train_text_encoder": True,
    "control": "segmentation", "control_encoder": "controlnet", "resolution": 8,
    "eval_encoder": "dino=facebook/dinov2-small", "num_eval_images": 3,
    "inference_steps": 3, "guidance_scale": 2.0, "max_new_tokens": 5, "num_beams": 3, "length_penalty": 1.0,
    "no_repeat_ngram_size": 2, "score_split": "validation",
}
TARGETS = {"classification": "query", "causal-lm": "c_proj", "data-to-text": "c_proj", "subject-driven": "to_k",
           "controllable": "to_k"}


def with_fewer_layers(source, folder, key: str):
    """A copy of a saved model folder whose config has one layer (another model to load, same tokenizer)."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from peftlab.data import generate_arithmetic, generate_e2e

    root = tmp_path_factory.mktemp("walk")
    save_tiny_classifier(root / "classifier")  # without its head, as a hub encoder: --num-labels sizes a new one
    weights = root / "classifier" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}, weights,
              metadata={"format": "pt"})
    rows = generate_arithmetic(40)
    pairs = generate_e2e(24)
    save_tiny_lm(root / "lm", [r["instruction"] + "\n" + r["output"] for r in rows] + list(pairs["mr"])
                 + list(pairs["ref"]), vocab_size=300)
    words = "good bad fine plot actor long short film story scene".split()
    lines = ["text,other,sentence,label,label2"]
    for i in range(48):
        lines.append(f"{words[i % 10]} {words[(3 * i) % 10]},{words[(7 * i) % 10]},{words[(i + 5) % 10]} x,{i % 2},"
                     f"{(i // 2) % 2}")
    (root / "cls.csv").write_text("\n".join(lines) + "\n")
    (root / "cls2.csv").write_text("\n".join(lines[:1] + lines[1:30]) + "\n")
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "math2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate_arithmetic(30, seed=5)))
    (root / "e2e.txt").write_text("".join(f"{m} || {r}\n" for m, r in zip(pairs["mr"], pairs["ref"], strict=True)))
    other = generate_e2e(16, seed=4)
    (root / "e2e2.txt").write_text("".join(f"{m} || {r}\n" for m, r in zip(other["mr"], other["ref"], strict=True)))
    tiny_sd_pipeline(unet_widths=(16, 32), vae_widths=(8, 16), norm_groups=8, latent_size=8,
                     image_size=16).save_pretrained(root / "sd")
    with_fewer_layers(root / "classifier", root / "classifier-1", "num_hidden_layers")
    with_fewer_layers(root / "lm", root / "lm-1", "n_layer")
    shutil.copytree(root / "sd", root / "sd-1")
    with_fewer_layers(root / "sd" / "text_encoder", root / "sd-1" / "te", "num_hidden_layers")
    shutil.rmtree(root / "sd-1" / "text_encoder")
    (root / "sd-1" / "te").rename(root / "sd-1" / "text_encoder")
    from test_image_recipes import write_digits

    write_digits(root / "digits", count=6)
    write_digits(root / "digits-2", count=4)
    return root


@pytest.fixture(scope="module")
def cached_loading():
    """Models, pipelines and data loaded once; each plan gets its own copy of a model."""
    from peftlab import base_models as models
    from peftlab import data as data_module
    from peftlab.diffusion import pipeline
    from peftlab.recipes.image import data as image_data
    from peftlab.recipes.text import causal_lm, data_to_text

    patch = pytest.MonkeyPatch()
    load, load_pipeline = models._load, pipeline.load_pipeline
    cache: dict = {}

    def cached_load(auto_class, name, trust_remote_code, **kwargs):
        if kwargs.get("quantization_config") is not None:
            return load(auto_class, name, trust_remote_code, **kwargs)
        key = (auto_class.__name__, name, repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load(auto_class, name, trust_remote_code, **kwargs)
        model, tokenizer = cache[key]
        return copy.deepcopy(model), copy.deepcopy(tokenizer)

    def cached_pipeline(name, dtype=None):
        key = ("pipeline", str(name), str(dtype))
        if key not in cache:
            cache[key] = load_pipeline(name, dtype=dtype)
        return copy.deepcopy(cache[key])

    def class_images(pipe, identity, prompt, count, seed, size, steps, guidance):
        from PIL import Image

        return [Image.new("RGB", (size, size), (count, seed % 256, steps)) for _ in range(count)], True

    patch.setattr(models, "_load", cached_load)
    patch.setattr(pipeline, "load_pipeline", cached_pipeline)
    patch.setattr(image_data, "class_images", class_images)
    patch.setattr(data_module, "load_dataset", cached(data_module.load_dataset))
    patch.setattr(causal_lm, "load_records", cached(causal_lm.load_records))
    patch.setattr(data_to_text, "load_pairs", cached(data_to_text.load_pairs))
    yield
    patch.undo()


def cached(function):
    """``function`` with its results kept by the ``repr`` of its arguments (data sets: never changed in place)."""
    results: dict = {}

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in results:
            results[key] = function(*args, **kwargs)
        return results[key]

    return wrapper


def base_options(task: str, assets) -> dict:
    values = {"task": task, "output_dir": str(assets / "out"), "report_to": "none"}
    values.update({
        "classification": {"model": str(assets / "classifier"), "data": str(assets / "cls.csv")},
        "causal-lm": {"model": str(assets / "lm"), "data": str(assets / "math.jsonl")},
        "data-to-text": {"model": str(assets / "lm"), "data": str(assets / "e2e.txt")},
        "subject-driven": {"model": str(assets / "sd"), "num_class_images": 3, "num_eval_images": 2,
                           "inference_steps": 2},
        "controllable": {"model": str(assets / "sd"), "data": str(assets / "digits"), "num_eval_images": 2,
                         "inference_steps": 2},
    }[task])
    return values


def changed_value(task: str, name: str, assets):
    if name == "model":
        return str(assets / {"classification": "classifier-1", "subject-driven": "sd-1",
                             "controllable": "sd-1"}.get(task, "lm-1"))
    if name == "data":
        return str(assets / {"classification": "cls2.csv", "causal-lm": "math2.jsonl", "data-to-text": "e2e2.txt",
                             "controllable": "digits-2"}.get(task, "cls2.csv"))
    if name == "target_modules":
        return TARGETS[task]
    if name == "max_length":  # cuts some examples of the task's data, not all their responses
        return {"causal-lm": 170, "data-to-text": 100}.get(task, 3)
    if name in ("num_class_images", "num_eval_images", "inference_steps"):
        return 4
    return VALUES[name]


def canonical(plan: dict) -> str:
    return json.dumps(plan, sort_keys=True, default=str)


@pytest.mark.parametrize("task", TASKS)
def test_every_option_changes_the_run_or_is_refused(task, assets, cached_loading):
    base = base_options(task, assets)
    default = canonical(planning.plan(RunOptions(**base)))
    assert default == canonical(planning.plan(RunOptions(**base)))  # the plan itself is deterministic
    unchanged, wrongly_accepted = [], []
    for f in dataclasses.fields(RunOptions):
        if f.name in NOT_COMPUTATION:
            continue
        options = RunOptions(**{**base, f.name: changed_value(task, f.name, assets)})
        if task not in f.metadata["tasks"]:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            try:
                options.resolved()
            except RecipeError as err:
                assert str(err).startswith(f"{flag} is for --task ") and "\n" not in str(err), str(err)
                continue
            wrongly_accepted.append(f.name)
            continue
        if canonical(planning.plan(options)) == default:
            unchanged.append(f.name)
    assert not wrongly_accepted, f"{task}: accepted but unused: {wrongly_accepted}"
    assert not unchanged, f"{task}: accepted but the run is the same: {unchanged}"


def test_the_walk_covers_every_option():
    names = {f.name for f in dataclasses.fields(RunOptions)}
    assert names <= set(VALUES) | set(NOT_COMPUTATION) | {"model", "data", "target_modules"}
    for f in dataclasses.fields(RunOptions):
        assert set(f.metadata["tasks"]) <= set(TASKS) and f.metadata["tasks"], f.name
