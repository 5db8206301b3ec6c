"""How a run scales: mixed precision, gradient accumulation and checkpointing, the base model's dtype or
quantization, ``torch.compile`` -- and :func:`plan`, what a run would run, built without training.

Each option becomes the setting of the library that implements it, in one place:

* text tasks (HF ``Trainer``): :func:`trainer_kwargs` → ``TrainingArguments(bf16 / fp16,
  gradient_accumulation_steps, gradient_checkpointing (use_reentrant=False), torch_compile)``;
  :func:`load_kwargs` → ``from_pretrained(dtype=..., quantization_config=BitsAndBytesConfig(...))``
  (4-bit NF4 with the compute dtype of the run, or LLM.int8());
* image tasks (HF ``accelerate``): :func:`accelerator_kwargs` → ``Accelerator(mixed_precision,
  gradient_accumulation_steps)``; :func:`pipeline_dtype` → the pipeline's weights; :func:`unet_training`
  turns on the UNet's checkpointing (``AdapterModel.gradient_checkpointing_enable``) and ``nn.Module.compile``
  while the loop runs.

Adapters stay float32 on a bf16 / fp16 / quantized base. A setting this machine cannot honour is a one-line
RecipeError (:func:`check_device`), never silently ignored: accelerate runs fp16 autocast only on an accelerator
(on CPU it would train in float32 without a word).

:func:`plan` returns, for any task, what its recipe builds before ``trainer.train()`` / ``fit``, through the same
functions the recipe calls: the ``TrainingArguments`` (or the accelerate settings), the model's dtype,
quantization, checkpointing and adapter, the data sizes and the generation or sampling settings.
``tests/test_options_walk.py`` checks with it that every option of ``RunOptions`` changes what runs, or is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from peftlab.errors import RecipeError
from peftlab.recipes.options import RunOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def check_device(options: RunOptions) -> None:
    """RecipeError for a setting this machine cannot honour (fp16 autocast without a GPU, quantization without
    bitsandbytes)."""
    import importlib.util

    if options.mixed_precision == "fp16" and not on_gpu():
        raise RecipeError("--mixed-precision fp16 needs a CUDA GPU (accelerate and HF Trainer autocast fp16 only "
                          "there, on CPU the run would stay float32); on CPU use --mixed-precision bf16")
    if quantized(options) and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("--load-in-4bit / --load-in-8bit need the bitsandbytes package: pip install "
                          "bitsandbytes==0.50.2")


def quantized(options: RunOptions) -> bool:
    return bool(options.load_in_4bit or options.load_in_8bit)


def compute_dtype(options: RunOptions) -> torch.dtype:
    """The dtype the base's layers compute in: the autocast dtype with mixed precision, else the weights'."""
    return AUTOCAST.get(options.mixed_precision, DTYPES[options.torch_dtype])


def quantization_config(options: RunOptions) -> Any:
    """transformers' ``BitsAndBytesConfig`` of ``--load-in-4bit`` (NF4 with double quantization, as QLoRA; computing
    in :func:`compute_dtype`) or
    ``--load-in-8bit``; ``None`` without them."""
    if not quantized(options):
        return None
    from transformers import BitsAndBytesConfig

    if options.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(options))
    return BitsAndBytesConfig(load_in_8bit=True)


def load_kwargs(options: RunOptions) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of a text task's base model: its dtype and quantization (a quantized
    model is placed on this process's device at load, as bitsandbytes needs)."""
    check_device(options)
    kwargs: dict[str, Any] = {"dtype": DTYPES[options.torch_dtype]}
    config = quantization_config(options)
    if config is not None:
        from accelerate import PartialState

        kwargs.update(quantization_config=config, device_map={"": PartialState().device})
    return kwargs


def trainer_kwargs(options: RunOptions) -> dict[str, Any]:
    """The ``TrainingArguments`` of the scale options (HF needs ``use_cpu`` for bf16 autocast without a GPU)."""
    check_device(options)
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": options.gradient_accumulation_steps}
    if options.mixed_precision == "bf16":
        kwargs.update(bf16=True, **({} if on_gpu() else {"use_cpu": True}))
    elif options.mixed_precision == "fp16":
        kwargs["fp16"] = True
    if options.gradient_checkpointing:
        kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.torch_compile:
        kwargs["torch_compile"] = True
    return kwargs


def accelerator_kwargs(options: RunOptions) -> dict[str, Any]:
    """``Accelerator`` keyword arguments of an image run."""
    check_device(options)
    return {"mixed_precision": options.mixed_precision, "gradient_accumulation_steps":
            options.gradient_accumulation_steps, "cpu": not on_gpu()}


def pipeline_dtype(options: RunOptions) -> torch.dtype:
    """The dtype of an image pipeline's weights (``--torch-dtype``); quantized pipelines are refused."""
    check_device(options)
    return DTYPES[options.torch_dtype]


@contextmanager
def unet_training(pipe: Any, models: dict[str, Any], options: RunOptions) -> Iterator[None]:
    """While the image loop runs: gradient checkpointing of the adapted UNet (``AdapterModel``'s, diffusers'
    ``enable_gradient_checkpointing`` underneath), undone after, so sampling runs the plain model. (``--torch-compile``
    is refused for the image tasks: see ``RunOptions.torch_compile``.)"""
    if options.gradient_checkpointing:
        models["unet"].gradient_checkpointing_enable({"use_reentrant": False})
    try:
        yield
    finally:
        if options.gradient_checkpointing:
            models["unet"].gradient_checkpointing_disable()


# -- the plan ----------------------------------------------------------------------------------------------------
def generation_kwargs(options: RunOptions) -> dict[str, Any]:
    """The decoding settings of a causal-LM / data-to-text run's test generations (``generation.generate``)."""
    return {"batch_size": options.eval_batch_size, "max_new_tokens": options.max_new_tokens,
            "num_beams": options.num_beams, "length_penalty": options.length_penalty,
            "no_repeat_ngram_size": options.no_repeat_ngram_size, "max_prompt_length": options.max_length}


def sampling_kwargs(options: RunOptions) -> dict[str, Any]:
    """The sampling settings of an image run's metric samples (``image_training.sample_images``)."""
    return {"num_inference_steps": options.inference_steps, "guidance_scale": options.guidance_scale}
