"""The scale options really reach a run: mixed precision, gradient accumulation and checkpointing seen inside a
2-step text run, a QLoRA run on a 4-bit causal LM whose adapter then loads on the float32 base, ``--torch-dtype``,
and the one-line refusals (fp16 autocast without a GPU, both quantizations, full fine-tuning of a quantized base,
a quantized image pipeline)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from conftest import save_tiny_classifier, save_tiny_lm, write_keyword_csv

from peftlab import files
from peftlab.cli import main
from peftlab.errors import RecipeError
from peftlab.recipes import scale
from peftlab.recipes.options import RunOptions
from peftlab.recipes.plan import plan as run_plan
from peftlab.recipes.text import causal_lm, classification, lm

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    save_tiny_classifier(folder / "model")
    write_keyword_csv(folder / "data.csv", 40)
    return folder


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    from peftlab.data import generate_arithmetic

    folder = tmp_path_factory.mktemp("lm")
    rows = generate_arithmetic(60)
    save_tiny_lm(folder / "model", [causal_lm.PROMPT] * 5 + [r["instruction"] + "\n" + r["output"] for r in rows],
                 vocab_size=400)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def recording(monkeypatch, module, layer_of):
    """Wrap ``module.run_training``: record the trainer's arguments and, for each training-mode forward of the
    layer ``layer_of(model)``, its output dtype (autocast) -- a checkpointed block runs its forward twice."""
    seen: dict = {"dtypes": [], "args": None, "quantized": None}
    run_training = module.run_training

    def wrapper(trainer, checkpoint):
        layer = layer_of(trainer.model.base_model)
        seen["args"] = trainer.args
        seen["quantized"] = sorted({type(m).__name__ for m in trainer.model.modules()
                                    if type(m).__module__.startswith("bitsandbytes")})

        def hook(module, args, output):
            if module.training:
                seen["dtypes"].append(output.dtype)

        handle = layer.register_forward_hook(hook)
        try:
            return run_training(trainer, checkpoint)
        finally:
            handle.remove()

    monkeypatch.setattr(module, "run_training", wrapper)
    return seen


def test_bf16_accumulation_and_checkpointing_reach_a_text_run(classifier, tmp_path, monkeypatch):
    seen = recording(monkeypatch, classification, lambda base: base.bert.encoder.layer[0].intermediate.dense)
    out = tmp_path / "run"
    assert main(["train", "--model", str(classifier / "model"), "--data", str(classifier / "data.csv"), "--method",
                 "lora", "--max-train-samples", "16", "--batch-size", "4", "--epochs", "1", "--mixed-precision", "bf16",
                 "--gradient-accumulation-steps", "2", "--gradient-checkpointing", "--no-initial-eval", "--report-to",
                 "none", "--output-dir", str(out)]) == 0
    args = seen["args"]
    assert args.bf16 and args.gradient_accumulation_steps == 2 and args.gradient_checkpointing
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2  # 16 examples in batches of 4, two batches per optimizer step (4 without)
    # 2 steps x 2 micro-batches, each block's forward run again in backward (checkpointing): 8 training forwards,
    # every one under bf16 autocast
    assert seen["dtypes"] == [torch.bfloat16] * 8
    saved = json.loads((out / "run_config.json").read_text())["options"]
    assert saved["mixed_precision"] == "bf16" and saved["gradient_accumulation_steps"] == 2


def test_a_4bit_causal_lm_trains_and_its_adapter_loads_on_the_float32_base(tiny_causal_lm, tmp_path, monkeypatch):
    seen = recording(monkeypatch, causal_lm, lambda base: base.transformer.h[0].mlp.c_fc)
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_causal_lm / "model"), "--data",
                 str(tiny_causal_lm / "data.jsonl"), "--method", "lora", "--target-modules", "c_attn,c_fc", "--lr",
                 "1e-2", "--max-steps", "2", "--batch-size", "4", "--load-in-4bit", "--no-initial-eval",
                 "--max-test-samples", "2", "--max-new-tokens", "4", "--report-to", "none", "--output-dir",
                 str(out)]) == 0
    assert seen["quantized"] == ["Linear4bit"] and len(seen["dtypes"]) == 2  # the 4-bit model is what trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test"]["loss"])
    weights = files.load_tensors(out)
    assert any(k.endswith("lora_B") or "lora_B" in k for k in weights)
    assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = lm.load_trained(out)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    assert {str(p.dtype) for p in model.parameters()} == {"torch.float32"}
    loaded = model.adapter_state_dict("default")
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    ids = tokenizer("1 + 2 =", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-4  # the trained adapter acts on the float32 base


def test_torch_dtype_loads_the_base_in_bf16_with_float32_adapters(classifier):
    plan = run_plan(RunOptions(model=str(classifier / "model"), data=str(classifier / "data.csv"), method="hra",
                                 torch_dtype="bfloat16", output_dir="unused", report_to="none"))
    assert plan["model"]["frozen_dtypes"] == ["torch.bfloat16"]
    assert plan["model"]["adapter_dtypes"] == ["torch.float32"]


def bad(tmp_path, classifier, *flags):
    return ["train", "--model", str(classifier / "model"), "--data", str(classifier / "data.csv"), "--output-dir",
            str(tmp_path / "out"), *flags]


@pytest.mark.parametrize(("flags", "message"), [
    (["--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit both quantize the base model: pick one"),
    (["--method", "full", "--load-in-4bit"], "--method full trains the base model's own weights"),
    (["--method", "linear-probe", "--load-in-8bit"], "--method linear-probe trains the base model's own weights"),
    (["--task", "controllable", "--load-in-4bit"], "--load-in-4bit is for --task classification / causal-lm / "
                                                   "data-to-text only; --task controllable does not use it"),
    (["--task", "data-to-text", "--no-initial-eval"], "--no-initial-eval is for --task classification / causal-lm "
                                                      "only"),
])
def test_options_a_run_cannot_honour_are_one_line_errors(tmp_path, classifier, capsys, flags, message):
    assert main(bad(tmp_path, classifier, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a GPU")
def test_fp16_without_a_gpu_is_refused_and_says_what_to_use(tmp_path, classifier, capsys):
    assert main(bad(tmp_path, classifier, "--mixed-precision", "fp16")) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"peftlab train: error: --mixed-precision fp16 needs a CUDA GPU .* on CPU use "
                        r"--mixed-precision bf16", err), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU"):
        scale.accelerator_kwargs(RunOptions(task="controllable", mixed_precision="fp16").resolved())


def test_the_image_loop_takes_bf16_accumulation_and_checkpointing(tmp_path):
    pytest.importorskip("diffusers")
    from conftest import tiny_sd_pipeline

    from peftlab.recipes.image import training as it

    tiny_sd_pipeline(unet_widths=(16, 32), vae_widths=(8, 16), norm_groups=8, latent_size=8,
                     image_size=16).save_pretrained(tmp_path / "sd")
    options = RunOptions(task="controllable", model=str(tmp_path / "sd"), method="lora", r=2, batch_size=2, warmup=0,
                         max_steps=2, mixed_precision="bf16", gradient_accumulation_steps=2,
                         gradient_checkpointing=True, output_dir="unused", report_to="none").resolved()
    pipe = it.load_base(options)
    models = it.add_adapters(pipe, options, False, ["a handwritten digit 1"])
    seen = []
    unet = pipe.unet
    unet.conv_in.register_forward_hook(lambda m, a, out: seen.append((out.dtype, unet.is_gradient_checkpointing)))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    sample = it.example_sampler(it.latents_of(pipe, images), it.token_ids(pipe, ["a handwritten digit 1"] * 4),
                                torch.ones(4), 2, g, pipe.scheduler.config.num_train_timesteps)
    with scale.unet_training(pipe, models, options):
        result = it.fit(pipe, [m.base_model for m in models.values()], sample, options, progress=False)
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert seen == [(torch.bfloat16, True)] * 4  # 2 optimizer steps x 2 micro-batches, autocast, checkpointed
    assert not pipe.unet.is_gradient_checkpointing  # off again for sampling
