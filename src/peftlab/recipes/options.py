"""``RunOptions``: every option of a training run, with per-task defaults, checked in one place.

Each field carries its command-line help in its metadata (``help``, ``group``, and ``flag`` where the flag
is not ``--field-name``); :mod:`peftlab.cli` generates the flags of ``peftlab train`` / ``compare`` / ``eval``
from them, as ``HfArgumentParser`` does, so an option is declared once. ``None`` means "the task's
default" (``TASK_DEFAULTS``) or "the method's default" (``lr``). A run saves its options as
``run_config.json``; ``peftlab eval`` reads them back (:func:`eval_options`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import RecipeError

TEXT_TASKS = ("classification", "causal-lm", "data-to-text")
IMAGE_TASKS = ("subject-driven", "controllable")  # diffusers pipelines: recipes/subject_driven.py, controllable.py
TASKS = (*TEXT_TASKS, *IMAGE_TASKS)
CONTROLS = ("canny", "landmarks", "segmentation")  # peftlab.diffusion.control.CONTROLS (diffusers-free here)
CONTROL_ENCODERS = ("hint", "controlnet")  # peftlab.recipes.image.controllable: the condition path
MIXED_PRECISION = ("no", "fp16", "bf16")
TORCH_DTYPES = ("float32", "bfloat16", "float16")  # the base model's weights; adapters stay float32
LM_TASKS = ("causal-lm", "data-to-text")
# Experiment trackers (HF Trainer's report_to names; the image loop logs through accelerate's trackers of the same
# names). Logs go to <output-dir>/logs (TensorBoard) or to the tracker's own place (wandb, mlflow).
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# The image tasks' default lr is at most this: measured on tiny-digits (docs/benchmarks.md, "Image adapters"),
# HRA at its text default 1e-2 forgets much more of the prior than at 3e-3; LoRA-family defaults are 3e-3 already.
IMAGE_MAX_DEFAULT_LR = 3e-3
SPLITS = ("test", "validation", "train")
SCORE_SPLITS = ("test", "validation")  # what a run scores at its end (validation: a trial of `compare --tune`)
# Image tasks have no validation split: a validation score samples with the seed shifted by this (other noise; for
# tiny-digits-edges other held-out digits too), so a search never draws the samples the test score is taken on.
VALIDATION_SEED_OFFSET = 10_000
WHOLE = "all"  # the split name of a data file given to ``peftlab eval`` without --split: every row of it
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"model": "minilm", "data": "movie-snippets", "max_length": 64, "batch_size": 32,
                       "num_beams": 1, "max_new_tokens": 64},
    "causal-lm": {"model": "smollm2-135m", "data": "arithmetic", "max_length": 256, "batch_size": 8,
                  "max_test_samples": 200, "num_beams": 1, "max_new_tokens": 64},
    "data-to-text": {"model": "smollm2-135m", "data": "e2e-synthetic", "max_length": 128, "batch_size": 8,
                     "max_test_samples": 100, "num_beams": 10, "max_new_tokens": 64},
    "subject-driven": {"model": "tiny-digits", "instance_data": "glyph:K", "instance_prompt": "a handwritten sks glyph",
                       "class_prompt": "a handwritten letter", "num_class_images": 32, "batch_size": 4,
                       "max_steps": 300, "num_eval_images": 8},
    "controllable": {"model": "tiny-digits", "data": "tiny-digits-edges", "control": "canny",
                     "control_encoder": "hint", "batch_size": 8, "max_steps": 400, "max_train_samples": 512,
                     "num_eval_images": 20},
}
# Defaults of named data sets that need more than their task's (worked math solutions are long).
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "gsm-symbolic": {"max_length": 512, "max_new_tokens": 256},
    "gsm-easy": {"max_length": 256, "max_new_tokens": 128},
}
# Options that do not change what a run computes until it stops: they may differ when resuming.
NOT_IDENTITY = frozenset({
    "output_dir", "resume", "overwrite", "epochs", "max_steps", "eval_steps", "max_eval_samples",
    "max_test_samples", "eval_batch_size", "max_new_tokens", "num_beams", "length_penalty",
    "no_repeat_ngram_size", "initial_eval", "keep_checkpoints", "report_to",
})
POSITIVE_INTS = ("r", "batch_size", "eval_batch_size", "eval_steps", "max_length", "max_new_tokens", "max_steps",
                 "max_train_samples", "max_eval_samples", "max_test_samples", "num_labels", "num_beams",
                 "num_class_images", "resolution", "gradient_accumulation_steps", "num_eval_images", "inference_steps")
DATA, METHOD, TRAINING, GENERATION = "data and model", "method", "training", "generation (causal-lm, data-to-text)"
IMAGE = "image generation (subject-driven, controllable)"


def option(default: Any, help: str, group: str, tasks: tuple[str, ...] = TASKS, **metadata: Any) -> Any:
    """A ``RunOptions`` field with its command-line help (``flag``: a flag name other than ``--field-name``) and
    the tasks that use it (``tasks``): :meth:`RunOptions.resolved` refuses a value given for any other task."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "group": group, "tasks": tasks, **metadata})


@dataclass
class RunOptions:
    """Every option of a training run (the flags of ``peftlab train``; ``None`` = the task's default).

    Budget: ``epochs`` (default 1) unless ``max_steps`` is set. Evaluation and checkpoints every
    ``eval_steps``; the best checkpoint (by the task's main metric) is restored at the end.
    ``adapter_args`` are extra fields of the method's config (e.g. ``{"alpha": 16}``).
    """

    task: str = option("classification", "what to train", DATA, choices=TASKS)
    model: str | None = option(None, "model name (minilm, smollm2-135m), local folder or Hub name", DATA)
    data: str | None = option(None, "data set name or file", DATA,
                              tasks=("classification", "causal-lm", "data-to-text", "controllable"))
    text_column: str | None = option(None, "text column(s) of a data file, e.g. 'sentence1,sentence2' "
                                     "(default text)", DATA, tasks=("classification",))
    label_column: str | None = option(None, "label column of a data file (default label)", DATA,
                                      tasks=("classification",))
    num_labels: int | None = option(None, "number of classes; labels must be 0..N-1", DATA, tasks=("classification",))
    glue_task: str | None = option(None, "GLUE task name: its text columns and metrics (cola, sst2, mrpc, stsb, ...)",
                                   DATA, tasks=("classification",))
    max_length: int | None = option(None, "tokens per example", DATA, tasks=TEXT_TASKS)
    max_train_samples: int | None = option(None, "use at most N training examples", DATA,
                                           tasks=(*TEXT_TASKS, "controllable"))
    max_eval_samples: int | None = option(500, "validation examples per evaluation", DATA, tasks=TEXT_TASKS)
    max_test_samples: int | None = option(None, "test examples (or MRs) scored at the end", DATA, tasks=TEXT_TASKS)
    split_seed: int = option(0, "seed of the train/validation/test split", DATA, tasks=TEXT_TASKS)

    method: str = option("hra", "adapter method", METHOD)
    r: int = option(8, "adapter rank / number of reflections", METHOD)
    target_modules: list[str] | str | None = option(
        None, "comma-separated layer names, a regex or 'all-linear' (default: the attention query/value "
        "projections)", METHOD)
    adapter_args: dict[str, Any] = option(
        dict, "another field of the method's config, e.g. alpha=16 or orthogonality_weight=1e-4 (repeatable)",
        METHOD, flag="--adapter-arg")

    lr: float | None = option(None, "learning rate (default: the method's, e.g. hra 1e-2, lora 3e-3; image tasks: "
                              "at most 3e-3)", TRAINING)
    epochs: float = option(1.0, "epochs, unless --max-steps is given", TRAINING, tasks=TEXT_TASKS)
    max_steps: int | None = option(None, "optimizer steps (overrides --epochs)", TRAINING)
    batch_size: int | None = option(None, "per-device batch size", TRAINING)
    eval_batch_size: int | None = option(None, "evaluation batch size (default 2x batch size)", TRAINING,
                                         tasks=TEXT_TASKS)
    eval_steps: int = option(50, "evaluate and checkpoint every N steps (image tasks: checkpoint)", TRAINING)
    warmup: float = option(0.06, "warm-up steps, or a fraction of the run if < 1", TRAINING)
    weight_decay: float = option(0.0, "AdamW weight decay", TRAINING)
    label_smoothing: float = option(0.0, "label smoothing (MTLoRA on E2E: 0.1)", TRAINING, tasks=TEXT_TASKS)
    seed: int = option(0, "seed of initialisation and data order", TRAINING)
    resume: bool = option(False, "continue from the last complete checkpoint in --output-dir (a finished run: "
                          "nothing to do; no complete checkpoint yet: start again)", TRAINING)
    output_dir: str | None = option(None, "where the run goes (default runs/<task>-<method>-<data>)", TRAINING)
    overwrite: bool = option(False, "replace an earlier run in --output-dir (never done without it)", TRAINING)
    initial_eval: bool = option(True, "skip the step-0 evaluation of the untrained model", TRAINING,
                                flag="--no-initial-eval", tasks=("classification", "causal-lm"))
    mixed_precision: str = option("no", "autocast the forward in bf16 or fp16, weights and optimizer in float32 (HF "
                                  "Trainer / accelerate; fp16 needs a GPU)", TRAINING, choices=MIXED_PRECISION)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", TRAINING)
    gradient_checkpointing: bool = option(False, "recompute activations in backward instead of keeping them (less "
                                          "memory, ~30%% more time)", TRAINING)
    torch_dtype: str = option("float32", "dtype of the base model's weights (adapters stay float32)", TRAINING,
                              choices=TORCH_DTYPES)
    load_in_4bit: bool = option(False, "QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes)", TRAINING,
                                tasks=TEXT_TASKS)
    load_in_8bit: bool = option(False, "the base model's linear layers in int8 (bitsandbytes LLM.int8())", TRAINING,
                                tasks=TEXT_TASKS)
    # image tasks: the adapted UNet recompiles per adapted layer (dynamo's recompile limit) and a tiny run had not
    # finished after 15 min on CPU, so only the text tasks take it for now
    torch_compile: bool = option(False, "torch.compile the model (HF Trainer's torch_compile)", TRAINING,
                                 tasks=TEXT_TASKS)
    keep_checkpoints: bool = option(True, "", TRAINING, cli=False)
    # the split the run is scored on at its end (and before training): test; `peftlab compare --tune` trains its
    # trials with "validation", so that a search never reads the test split
    score_split: str = option("test", "", TRAINING, cli=False)
    report_to: str | None = option(None, "experiment tracking: tensorboard (logs in <output-dir>/logs), wandb, "
                                   "mlflow or none (default: tensorboard when it is installed)", TRAINING,
                                   choices=REPORT_TO)

    instance_data: str | None = option(None, "subject-driven: a folder of subject images, or glyph:LETTER (6 "
                                       "renderings of an unseen letter in one font, offline)", IMAGE,
                                       tasks=("subject-driven",))
    instance_prompt: str | None = option(None, "subject-driven: the prompt of the subject, with its rare token",
                                         IMAGE, tasks=("subject-driven",))
    class_prompt: str | None = option(None, "subject-driven: the prompt of the subject's class (prior preservation)",
                                      IMAGE, tasks=("subject-driven",))
    prior_loss_weight: float = option(1.0, "subject-driven: weight λ of the class-image loss (0: no prior "
                                      "preservation)", IMAGE, tasks=("subject-driven",))
    num_class_images: int | None = option(None, "subject-driven: class images generated once by the base model "
                                          "and cached", IMAGE, tasks=("subject-driven",))
    train_text_encoder: bool = option(False, "subject-driven / controllable: adapt the text encoder too", IMAGE,
                                      tasks=IMAGE_TASKS)
    control: str | None = option(None, "controllable: the control map computed from the targets", IMAGE,
                                 choices=CONTROLS, tasks=("controllable",))
    control_encoder: str | None = option(None, "controllable: the condition path: hint (a small encoder added to "
                                         "conv_in's output) or controlnet (a trainable copy of the UNet's encoder "
                                         "feeding every down block and the mid block)", IMAGE,
                                         choices=CONTROL_ENCODERS, tasks=("controllable",))
    resolution: int | None = option(None, "image size in pixels (default: the model's)", IMAGE, tasks=IMAGE_TASKS)
    eval_encoder: str | None = option(None, "CLIP encoder for CLIP-I / CLIP-T (NAME), and DINO (dino=NAME), e.g. "
                                      "openai/clip-vit-base-patch32,dino=facebook/dinov2-small", IMAGE,
                                      tasks=("subject-driven",))
    num_eval_images: int | None = option(None, "images sampled for the metrics before and after training", IMAGE,
                                         tasks=IMAGE_TASKS)
    inference_steps: int = option(20, "denoising steps of the metric samples and class images", IMAGE,
                                  tasks=IMAGE_TASKS)
    guidance_scale: float = option(4.0, "classifier-free guidance of the metric samples and class images", IMAGE,
                                   tasks=IMAGE_TASKS)

    max_new_tokens: int | None = option(None, "tokens generated per example", GENERATION, tasks=LM_TASKS)
    num_beams: int | None = option(None, "beam size", GENERATION, tasks=LM_TASKS)
    length_penalty: float = option(0.9, "beam-search length penalty", GENERATION, tasks=LM_TASKS)
    no_repeat_ngram_size: int = option(4, "forbid repeated n-grams in beam search", GENERATION, tasks=LM_TASKS)

    def resolved(self) -> RunOptions:
        """A copy with the task's defaults filled in and every value checked."""
        from peftlab.recipes.adapters import LINEAR_PROBE, method_spec

        if self.task not in TASKS:
            raise RecipeError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        self.refuse_unused()
        out = dataclasses.replace(self, adapter_args=dict(self.adapter_args))
        for key, value in {**TASK_DEFAULTS[self.task], **DATA_DEFAULTS.get(str(out.data or ""), {})}.items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        image = out.task in IMAGE_TASKS
        if out.output_dir is None:
            data = out.instance_data if out.task == "subject-driven" else out.data
            stem = re.sub(r"[^\w.-]", "-", Path(str(data)).stem)
            out.output_dir = str(Path("runs") / f"{out.task}-{out.method}-{stem}")
        spec = method_spec(out.method)
        if out.lr is None:
            out.lr = min(spec.lr, IMAGE_MAX_DEFAULT_LR) if image else spec.lr
        if image:
            self._check_image(out)
        if out.eval_batch_size is None:
            out.eval_batch_size = 2 * out.batch_size
        out.report_to = resolve_tracker(out.report_to)
        if isinstance(out.target_modules, str) and re.fullmatch(r"[\w.-]+(\s*,\s*[\w.-]+)*", out.target_modules):
            if out.target_modules != "all-linear":  # plain names are suffixes ("query,value"); else a regex
                out.target_modules = [t.strip() for t in out.target_modules.split(",")]
        for name in POSITIVE_INTS:
            value = getattr(out, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise RecipeError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}")
        if not (isinstance(out.lr, (int, float)) and math.isfinite(out.lr) and out.lr > 0):
            raise RecipeError(f"--lr must be a number > 0; got {out.lr!r}")
        for name, low, high in (("warmup", 0, math.inf), ("weight_decay", 0, math.inf), ("label_smoothing", 0, 1),
                                ("no_repeat_ngram_size", 0, math.inf), ("length_penalty", -math.inf, math.inf)):
            value = getattr(out, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high):
                raise RecipeError(f"--{name.replace('_', '-')} must be a number in [{low}, {high}); got {value!r}")
        if out.max_steps is None and not out.epochs > 0:
            raise RecipeError(f"--epochs must be > 0 (or give --max-steps); got {out.epochs!r}")
        if out.resume and out.overwrite:
            raise RecipeError("--resume continues the run in the output folder and --overwrite deletes it: pick one")
        for name, choices in (("mixed_precision", MIXED_PRECISION), ("torch_dtype", TORCH_DTYPES),
                              ("score_split", SCORE_SPLITS)):
            if getattr(out, name) not in choices:
                raise RecipeError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got "
                                  f"{getattr(out, name)!r}")
        if out.load_in_4bit and out.load_in_8bit:
            raise RecipeError("--load-in-4bit and --load-in-8bit both quantize the base model: pick one")
        if (out.load_in_4bit or out.load_in_8bit) and spec.config_class is None:
            raise RecipeError(f"--method {out.method} trains the base model's own weights, which cannot train "
                              "quantized; drop --load-in-4bit / --load-in-8bit or choose an adapter method")
        if out.method == LINEAR_PROBE and out.task != "classification":
            raise RecipeError("linear-probe trains only a classification head; it needs --task classification")
        return out

    @staticmethod
    def _check_image(out: RunOptions) -> None:
        """The image tasks' own checks."""
        if out.method in ("full", "linear-probe"):
            raise RecipeError(f"--task {out.task} trains adapters; choose an adapter --method, not {out.method}")
        if not (isinstance(out.prior_loss_weight, (int, float)) and math.isfinite(out.prior_loss_weight)
                and out.prior_loss_weight >= 0):
            raise RecipeError(f"--prior-loss-weight must be a number >= 0; got {out.prior_loss_weight!r}")
        if out.control is not None and out.control not in CONTROLS:
            raise RecipeError(f"unknown --control {out.control!r}; choose one of: {', '.join(CONTROLS)}")
        if out.control_encoder is not None and out.control_encoder not in CONTROL_ENCODERS:
            raise RecipeError(f"unknown --control-encoder {out.control_encoder!r}; choose one of: "
                              f"{', '.join(CONTROL_ENCODERS)}")
        if not isinstance(out.guidance_scale, (int, float)) or not math.isfinite(out.guidance_scale):
            raise RecipeError(f"--guidance-scale must be a finite number; got {out.guidance_scale!r}")

    def refuse_unused(self) -> None:
        """A one-line RecipeError for an option given (not its default, nor the task's) to a task that does not
        use it (the field's ``tasks``): a flag a task cannot honour is refused, never recorded and ignored."""
        task_defaults = {**TASK_DEFAULTS.get(self.task, {}), **DATA_DEFAULTS.get(str(self.data or ""), {})}
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default_factory() if callable(f.default_factory) else f.default
            if self.task in f.metadata["tasks"] or value == default or value == task_defaults.get(f.name, default):
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            raise RecipeError(f"{flag} is for --task {' / '.join(f.metadata['tasks'])} only; --task {self.task} "
                              "does not use it: drop it")

    def unused_reset(self) -> RunOptions:
        """A copy with every option the task does not use back at its default (a saved run's filled-in values)."""
        return dataclasses.replace(self, **{f.name: f.default_factory() if callable(f.default_factory) else f.default
                                            for f in dataclasses.fields(self) if self.task not in f.metadata["tasks"]})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def resolve_tracker(report_to: str | None) -> str:
    """The tracker a run reports to: ``report_to``, checked to be known and installed; ``None`` → ``tensorboard``
    when it is installed, else ``none``."""
    import importlib.util

    if report_to is None:
        return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    if report_to not in REPORT_TO:
        raise RecipeError(f"unknown --report-to {report_to!r}; choose one of: {', '.join(REPORT_TO)}")
    package = TRACKER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise RecipeError(f"--report-to {report_to} needs the {package} package: pip install {package} "
                          "(or --report-to none)")
    return report_to


def eval_options(folder: Any, task: str, saved: RunOptions | None, changes: dict[str, Any]) -> RunOptions:
    """The options a run was trained with (``saved``), updated by the evaluation's own (``None`` = keep)."""
    options = (saved or RunOptions(task=task)).unused_reset()
    changes = {k: v for k, v in changes.items() if v is not None}
    return RunOptions.from_dict({**options.to_dict(), **changes, "output_dir": str(folder), "resume": False,
                                 "overwrite": False}).resolved()


def sample_seed(options: RunOptions) -> int:
    """The seed of an image run's metric samples: ``options.seed``, shifted by :data:`VALIDATION_SEED_OFFSET` when
    the run is scored on validation (its samples are then never those of the test score)."""
    return options.seed + (VALIDATION_SEED_OFFSET if options.score_split == "validation" else 0)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise RecipeError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
