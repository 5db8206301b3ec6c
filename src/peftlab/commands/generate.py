"""``peftlab generate``: images from a text-to-image pipeline with a run's adapters, and a grid of them.

    peftlab generate --adapter runs/dog --prompt "a photo of sks dog" --num-images 4 --seed 0 --out grid.png

``--adapter`` is a pipeline adapter folder (``pipeline.json`` + one adapter folder per component, see
:mod:`peftlab.diffusion.pipeline`) or a merged pipeline folder; ``--model`` is the base pipeline (default: the
one the adapters name). The images are ``<out stem>-<i>.png`` next to the grid ``<out>``; every file is written
to a temporary file and renamed into place. The same ``--seed`` and ``--batch-size`` give the same images (the
initial noise comes from one CPU generator, so also across devices up to float rounding).

Limits, checked before the pipeline is loaded: at most :data:`MAX_IMAGES` images per call (every image is kept
for the grid), denoised ``--batch-size`` at a time so that memory does not grow with ``--num-images``; the folder
of ``--out`` must be writable (a folder, or creatable). With ``--control-type`` on a run trained with another
control map (its ``run_config.json``), the error names the type the run was trained with.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab import files
from peftlab.errors import RecipeError

MAX_IMAGES = 256  # per call: the images are kept for the grid (256 at 512² are ~200 MB)
SCHEDULER_EXAMPLES = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                      "EulerAncestralDiscreteScheduler", "PNDMScheduler", "LMSDiscreteScheduler")


def _flag(help: str, **meta: Any) -> Any:
    return field(default=meta.pop("default", None), metadata={"help": help, "group": "generate", **meta})


@dataclass
class GenerateOptions:
    """What ``peftlab generate`` takes; the CLI has one flag per field (``--num-images``). ``None``: the default."""

    prompt: str | None = _flag("text prompt (required)")
    adapter: str | None = _flag("pipeline adapter folder (a run of an image recipe) or a merged pipeline folder")
    model: str | None = _flag("base diffusers pipeline folder or tiny-digits (default: the adapters' base)")
    negative_prompt: str | None = _flag("what the images should not show (classifier-free guidance)")
    control: str | None = _flag("control image, for runs that trained a control encoder")
    control_type: str | None = _flag("compute the control map from --control IMG (then any image like the "
                                     "targets): canny, landmarks or segmentation; the map is written as "
                                     "<stem>-control.png (default: --control IMG is the map itself)")
    num_images: int = _flag(f"number of images, at most {MAX_IMAGES} per call", default=4)
    batch_size: int = _flag("images denoised at once (memory grows with it, not with --num-images)", default=4)
    seed: int = _flag("seed of the initial noise", default=0)
    steps: int = _flag("denoising steps", default=20)
    guidance_scale: float = _flag("classifier-free guidance scale (1: none)", default=7.5)
    scheduler: str | None = _flag("a diffusers scheduler class, e.g. " + ", ".join(SCHEDULER_EXAMPLES[:3])
                                  + " (default: the pipeline's)")
    height: int | None = _flag("image height in pixels, a multiple of 8 (default: the model's)")
    width: int | None = _flag("image width in pixels, a multiple of 8 (default: the model's)")
    out: str = _flag("the grid PNG; the images go next to it as <stem>-<i>.png", default="grid.png")

    @staticmethod
    def flag_help() -> dict[str, str]:
        """Each flag's help as written on its field (no per-task defaults: ``--model`` here is a pipeline)."""
        from dataclasses import fields

        return {f.name: f.metadata["help"] + ("" if f.default is None else f" (default {f.default})")
                for f in fields(GenerateOptions)}

    def validate(self) -> None:
        """One-line errors for values no pipeline can use."""
        if not self.prompt:
            raise RecipeError("the following arguments are required: --prompt")
        for name in ("num_images", "batch_size", "steps", "height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise RecipeError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}")
        if self.num_images > MAX_IMAGES:
            raise RecipeError(f"--num-images {self.num_images} is over the limit of {MAX_IMAGES} images per call (all "
                              "are kept for the grid); make several calls with different --seed and --out")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise RecipeError(f"--guidance-scale must be a finite number; got {self.guidance_scale!r}")
        if not str(self.out).lower().endswith(".png") or Path(self.out).is_dir():
            raise RecipeError(f"--out {self.out} must name a .png file (the grid)")
        check_writable(Path(self.out))
        if self.control_type is not None:
            from peftlab.diffusion.control import CONTROLS

            if self.control_type not in CONTROLS:
                raise RecipeError(f"unknown --control-type {self.control_type!r}; choose one of: {', '.join(CONTROLS)}")
            if self.control is None:
                raise RecipeError("--control-type computes the control map of an image: pass it with --control IMG")


def check_writable(out: Path) -> None:
    """RecipeError unless the images can be written next to ``out``: its folder is a folder (or can be made) in
    which a file can be created."""
    import tempfile

    folder = out.absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise RecipeError(f"--out {out}: {existing} is a file, not a folder; choose an --out in a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RecipeError(f"--out {out}: cannot write in {existing} ({err.strerror or err}); choose an --out in a "
                          "writable folder") from None


def trained_control(adapter: str | None) -> str | None:
    """The control map type a run was trained with (its ``run_config.json``; a checkpoint: its run's), or None."""
    from peftlab.recipes.rundir import read_run

    if adapter is None:
        return None
    folder = Path(adapter)
    for candidate in (folder, folder.parent) if folder.name.startswith("checkpoint-") else (folder,):
        options = (read_run(candidate) or {}).get("options") or {}
        if options.get("task") == "controllable" and options.get("control"):
            return str(options["control"])
    return None


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``, or RecipeError listing some that exist."""
    import diffusers
    from diffusers import SchedulerMixin

    try:
        cls = getattr(diffusers, name) if name.isidentifier() else None
    except (AttributeError, ImportError, RuntimeError):  # diffusers' lazy module raises these for unknown names
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise RecipeError(f"unknown scheduler {name!r}; use a diffusers scheduler class such as "
                          f"{', '.join(SCHEDULER_EXAMPLES)}")
    return cls


def load_for_generation(adapter: str | None, model: str | None) -> Any:
    """The pipeline ``--adapter`` / ``--model`` describe (adapters on, in inference mode)."""
    from peftlab.diffusion.pipeline import MODEL_INDEX, is_pipeline_adapter_dir, load_pipeline, load_pipeline_adapters

    if adapter is None:
        if model is None:
            raise RecipeError("pass --adapter RUN (a run of an image recipe) or --model PIPELINE")
        return load_pipeline(model)
    if is_pipeline_adapter_dir(adapter):
        return load_pipeline_adapters(adapter, model)
    if (Path(adapter) / MODEL_INDEX).is_file():
        if model is not None:
            raise RecipeError(f"{adapter} is a whole pipeline (merged); --model applies only to adapter folders")
        return load_pipeline(adapter)
    raise RecipeError(f"{adapter} holds neither pipeline adapters (pipeline.json) nor a diffusers pipeline "
                      f"({MODEL_INDEX}); pass the output folder of an image recipe, or a merged pipeline")


def control_image(pipe: Any, path: str | None) -> dict[str, Any]:
    """``{"image": PIL image}`` for a pipeline with a control encoder (a ControlNet or peftlab's condition
    encoder), ``{}`` without; mismatches are errors."""
    from peftlab.diffusion.conditioning import condition_hook

    has_control = "controlnet" in pipe.components or condition_hook(pipe) is not None
    if path is None:
        if has_control:
            raise RecipeError("this run has a control encoder: pass a control image with --control IMG")
        return {}
    if not has_control:
        raise RecipeError("this run has no control encoder (no controlnet/ in its folder), so --control cannot be "
                          "used; train one with --task controllable")
    from peftlab.recipes.image.data import open_image

    return {"image": open_image(Path(path), "--control")}


def control_from_image(image: Any, control_type: str, height: int, width: int) -> Any:
    """The ``control_type`` map of ``image`` resized to the output size (as training computed it from each
    target at the training resolution); UnsupportedError / DataError when it cannot be computed."""
    from PIL import Image

    from peftlab.diffusion.control import make_control

    return make_control(image.resize((width, height), Image.Resampling.BICUBIC), control_type)


def image_size(pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): given, or the UNet's sample size × the VAE's scale factor; multiples of 8 (diffusers')."""
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    for flag, value in (("--height", height), ("--width", width)):
        if value % 8:
            raise RecipeError(f"{flag} {value} is not a multiple of 8, which the pipeline needs; use "
                              f"{max(8, value - value % 8)} or {value - value % 8 + 8}")
    return height, width


def generate(options: GenerateOptions) -> list[Path]:
    """Write ``options.num_images`` images and their grid; returns the paths (images first, grid last)."""
    import torch

    from peftlab.diffusion.tokenizer import check_prompt

    options.validate()
    trained = trained_control(options.adapter)
    if options.control_type is not None and trained not in (None, options.control_type):
        raise RecipeError(f"--control-type {options.control_type}: the run {options.adapter} was trained on "
                          f"{trained} control maps; pass --control-type {trained} (or a ready {trained} map with "
                          "--control alone)")
    pipe = load_for_generation(options.adapter, options.model)
    check_prompt(pipe.tokenizer, options.prompt, "--prompt")
    if options.negative_prompt is not None:
        check_prompt(pipe.tokenizer, options.negative_prompt, "--negative-prompt")
    control = control_image(pipe, options.control)
    height, width = image_size(pipe, options.height, options.width)
    control_map = None
    if options.control_type is not None:
        control_map = control_from_image(control["image"], options.control_type, height, width)
        control["image"] = control_map
    if options.scheduler:
        pipe.scheduler = scheduler_class(options.scheduler).from_config(pipe.scheduler.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    pipe.set_progress_bar_config(desc="peftlab generate", leave=False)
    generator = torch.Generator("cpu").manual_seed(options.seed)
    images: list[Any] = []
    with torch.inference_mode(), conditioned(pipe, control, height, width):
        while len(images) < options.num_images:  # --batch-size at a time, one generator: memory stays bounded
            count = min(options.batch_size, options.num_images - len(images))
            images += pipe(options.prompt, negative_prompt=options.negative_prompt, num_images_per_prompt=count,
                           num_inference_steps=options.steps, guidance_scale=options.guidance_scale, height=height,
                           width=width, generator=generator, output_type="pil", **control).images
    paths = write_images(images, Path(options.out))
    if control_map is not None:
        out = Path(options.out)
        paths.insert(-1, files.atomic_write_image(out.with_name(f"{out.stem}-control.png"), control_map))
    return paths


def conditioned(pipe: Any, control: dict[str, Any], height: int, width: int) -> Any:
    """A block in which peftlab's condition encoder sees the control image (resized to the output), if the
    pipeline has one; it then takes the image out of ``control`` (a ControlNet pipeline takes it as ``image=``)."""
    import contextlib

    from peftlab.diffusion.conditioning import condition_hook, controlled
    from peftlab.diffusion.control import control_tensor

    if condition_hook(pipe) is None or "image" not in control:
        return contextlib.nullcontext()
    image = control.pop("image").resize((width, height))
    return controlled(pipe, control_tensor([image], None))


def write_images(images: list[Any], out: Path) -> list[Path]:
    """Each image as ``<stem>-<i>.png`` next to ``out``, then the grid as ``out``; all written atomically."""
    paths = [files.atomic_write_image(out.with_name(f"{out.stem}-{i}.png"), image) for i, image in enumerate(images)]
    paths.append(files.atomic_write_image_grid(out, images))
    return paths


def run(args: argparse.Namespace) -> str:
    """``peftlab generate`` from parsed flags (``None``: the default); returns the line to print."""
    given = {k: v for k, v in vars(args).items() if k in GenerateOptions.__dataclass_fields__ and v is not None}
    options = GenerateOptions(**given)
    paths = generate(options)
    control = f", the {options.control_type} control map {paths[-2]}" if options.control_type else ""
    images = len(paths) - 1 - bool(options.control_type)
    return f"wrote {images} image(s) ({paths[0]}, ...){control} and their grid {paths[-1]}"


__all__ = ["GenerateOptions", "generate", "scheduler_class"]
