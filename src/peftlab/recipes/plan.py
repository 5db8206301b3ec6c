"""What a run would run, without training it: :func:`plan` builds each task's model, data, ``TrainingArguments``
(text) or accelerate / loop settings (image) through the recipes' own setup functions, so a test can check that
every option of :class:`~peftlab.recipes.options.RunOptions` changes what runs, or is refused
(``tests/test_options_walk.py``)."""

from __future__ import annotations

import hashlib
from typing import Any

from torch import nn

from peftlab.recipes.options import IMAGE_TASKS, RunOptions, sample_seed
from peftlab.recipes.scale import accelerator_kwargs, generation_kwargs, sampling_kwargs, unet_training


def model_state(model: nn.Module) -> dict[str, Any]:
    """What a model is before training: class, weight dtypes of the frozen and the trainable parameters,
    quantization, checkpointing and compile state, the adapter's config and the parameter counts."""
    from peftlab.model import AdapterModel

    base = model.base_model if isinstance(model, AdapterModel) else model
    frozen = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    trainable = [p for p in model.parameters() if p.requires_grad]
    quant = getattr(getattr(base, "config", None), "quantization_config", None)
    return {
        "class": type(base).__name__,
        "frozen_dtypes": frozen,
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),  # adapters, and a new head in the base's
        "adapter_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if ".adapters." in n}),
        "quantization": quant.to_dict() if hasattr(quant, "to_dict") else quant,
        "quantized_layers": sorted({type(m).__name__ for m in base.modules() if type(m).__module__.startswith(
            "bitsandbytes")}),
        "gradient_checkpointing": checkpointing(base),
        "compiled": getattr(base, "_compiled_call_impl", None) is not None,
        "adapter": {n: c.to_dict() for n, c in model.peft_config.items()} if isinstance(model, AdapterModel) else None,
        "trainable_params": sum(p.numel() for p in trainable),
        "head_shapes": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad and "adapter" not in n
                        and n.endswith("weight")},
    }


def checkpointing(model: nn.Module) -> bool:
    """Whether gradient checkpointing is on (transformers 5 and diffusers name the property differently)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def data_fingerprint(rows: Any) -> dict[str, Any]:
    """Rows and a hash of a tokenised split (its ``input_ids`` and ``labels``)."""
    digest = hashlib.sha256()
    for column in ("input_ids", "labels", "label"):
        if column in rows.column_names:
            digest.update(repr(rows[column]).encode())
    return {"rows": len(rows), "sha256": digest.hexdigest()[:16]}


def plan(options: RunOptions) -> dict[str, Any]:
    """What ``peftlab train`` would run with ``options``, built by the recipe's own setup, without training."""
    options = options.resolved()
    return image_plan(options) if options.task in IMAGE_TASKS else text_plan(options)


def text_plan(options: RunOptions) -> dict[str, Any]:
    """The plan of a text task: the recipe's setup (``classification.setup`` / ``lm.setup``)."""
    if options.task == "classification":
        from peftlab.recipes.text import classification

        run = classification.setup(options)
        model, args, splits = run.model, run.args, {"train": run.train_set, "validation": run.val_set,
                                                     "test": run.test_set}
        extra: dict[str, Any] = {"metric": run.metric, "labels": run.names}
    else:
        from peftlab.recipes.text import causal_lm, data_to_text, lm

        module = causal_lm if options.task == "causal-lm" else data_to_text
        records, prompt, response, test_rows = module.run_parts(options)
        model, tokenizer, train_set, val_set, args = lm.setup(options, records, prompt, response)
        test = test_rows(records)
        splits = {"train": train_set, "validation": val_set,
                  "test": lm.encode_records(test, tokenizer, options.max_length, prompt, response)}
        extra = {"generation": generation_kwargs(options)}
    arguments = args.to_dict()
    return {"task": options.task, "model": model_state(model), "training_arguments": arguments,
            "data": {k: data_fingerprint(v) for k, v in splits.items()},
            "evaluate_before_training": options.initial_eval, "keep_checkpoints": options.keep_checkpoints, **extra}


def image_plan(options: RunOptions) -> dict[str, Any]:
    """The plan of an image task: the recipe's ``prepare`` and ``add_adapters``, the UNet as the loop trains it
    (:func:`unet_training`), the accelerate, optimizer and sampling settings of ``fit`` / ``sample_images``."""
    import dataclasses

    from peftlab.recipes.image import controllable, subject_driven
    from peftlab.recipes.image.training import add_adapters, encoder_names

    module = subject_driven if options.task == "subject-driven" else controllable
    run = module.prepare(options)
    pipe = run.pipe
    models = add_adapters(pipe, options, options.train_text_encoder, run.prompts)
    with unet_training(pipe, models, options):
        state = {name: model_state(model) for name, model in models.items()}
    data: dict[str, Any] = {"prompts": list(run.prompts)}
    for field in dataclasses.fields(run):
        value = getattr(run, field.name)
        if isinstance(value, list) and value and field.name != "prompts":
            data[field.name] = image_fingerprint(value)
        elif hasattr(value, "captions") and hasattr(value, "controls"):
            data[field.name] = {"captions": list(value.captions), **image_fingerprint(value.controls)}
    settings = {name: getattr(options, name) for name in ("instance_prompt", "class_prompt", "prior_loss_weight",
                                                           "control") if getattr(options, name) is not None}
    components = {name: {"class": type(c).__name__, "params": sum(p.numel() for p in c.parameters()),
                         "dtypes": sorted({str(p.dtype) for p in c.parameters()})}
                  for name, c in pipe.components.items() if isinstance(c, nn.Module)}
    return {"task": options.task, "models": state, "components": components, "size": run.size, "data": data,
            "settings": settings, "metric_encoders": encoder_names(options.eval_encoder),
            "accelerator": accelerator_kwargs(options), "sampling": {**sampling_kwargs(options),
                                                                     "num_eval_images": options.num_eval_images,
                                                                     "seed": sample_seed(options)},
            "loop": {name: getattr(options, name) for name in ("lr", "weight_decay", "warmup", "max_steps",
                                                                "batch_size", "eval_steps", "seed")},
            "keep_checkpoints": options.keep_checkpoints}


def image_fingerprint(images: list[Any]) -> dict[str, Any]:
    """Count and hash of a list of images (PIL or arrays)."""
    import numpy as np

    digest = hashlib.sha256()
    for image in images:
        digest.update(np.ascontiguousarray(np.asarray(image)).tobytes())
    return {"count": len(images), "sha256": digest.hexdigest()[:16]}
