"""``AdapterModel.to_lora`` / ``peftlab export --format lora``: every method as a standard HF PEFT LoRA adapter.

Parametrised over the method registry, so a new method is covered. The reference is HF PEFT itself:
``PeftModel.from_pretrained(base, folder)`` must give peftlab's outputs within 1e-4 (fp32) on a tiny random
Llama, BERT and GPT-2 (Conv1D, fused ``c_attn``), and diffusers' ``pipe.load_lora_weights(folder)`` peftlab's
UNet and text-encoder outputs and denoised latents. Adapters are moved off their identity init first and the
test checks that they change the output by far more than the tolerance. Methods whose export needs options
(HydraLoRA's ``head_weights``) are compared with peftlab's merge with the same options, which folds the same
fixed update.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_sd_pipeline
from test_contract import merge_options  # the methods' neutral options (HydraLoRA: uniform head weights)
from torch import nn

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterModel, get_adapter_model
from peftlab.cli import main
from peftlab.errors import MergeError, UnsupportedError
from peftlab.methods.base import ADAPTERS
from peftlab.methods.hra import householder_wy, normalized_columns, reflect_weight
from peftlab.methods.hydralora import HydraLoraConfig
from peftlab.methods.lora import LoraConfig

peft = pytest.importorskip("peft")

METHOD_NAMES = sorted(ADAPTERS)
ATOL = 1e-4
CHANGED = 1e-2  # the adapter moves the outputs by more than this: 100 × the tolerance


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


ARCHS = {  # builder, target modules (GPT-2: Conv1D layers, c_attn fused q|k|v)
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
}


def perturb(model: AdapterModel, adapter_name: str, seed: int = 0, scale: float = 0.5) -> None:
    """Move every parameter of one adapter away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model._layers():
            if adapter_name in layer.adapters:
                for p in layer.adapters[adapter_name].parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states and logits, flattened into one tensor."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


def reference(model: AdapterModel, ids: torch.Tensor, options: dict) -> torch.Tensor:
    """peftlab's outputs; with export options, those of the merge with the same options (the same fixed ΔW)."""
    if not options:
        return outputs(model, ids)
    model.merge(**options)
    try:
        return outputs(model, ids)
    finally:
        model.unmerge()


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def test_hra_is_a_lora_with_a_t_vt_and_b_minus_w_v():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64, generator=g)
    v = normalized_columns(torch.randn(64, 8, dtype=torch.float64, generator=g))
    t = householder_wy(v)
    dense_h = torch.eye(64, dtype=torch.float64)
    for i in range(8):  # H = H₁⋯H_r, each I − 2·v·vᵀ
        dense_h = dense_h @ (torch.eye(64, dtype=torch.float64) - 2 * torch.outer(v[:, i], v[:, i]))
    lora = w + (-(w @ v)) @ (t @ v.t())
    torch.testing.assert_close(lora, w @ dense_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(reflect_weight(w, v, t), lora, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_peft_loads_the_export_and_matches(method, arch, tmp_path):
    build, targets = ARCHS[arch]
    model = get_adapter_model(build(), ADAPTERS[method].config_class(r=2, target_modules=targets))
    perturb(model, "default")
    options = merge_options(model, ["default"])
    expected = reference(model, IDS, options)
    assert (expected - outputs(build(), IDS)).abs().max() > CHANGED
    export = model.to_lora(save_directory=tmp_path, **options)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert all(k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
               for k in export.tensors)
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, IDS), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if "embedding" in ADAPTERS[m].supported_kinds])
def test_embedding_layers_export_as_peft_lora_embeddings(method, tmp_path):
    model = get_adapter_model(tiny_llama(), ADAPTERS[method].config_class(r=2, target_modules=["embed_tokens"]))
    perturb(model, "default")
    expected = outputs(model, IDS)
    assert (expected - outputs(tiny_llama(), IDS)).abs().max() > CHANGED
    export = model.to_lora(save_directory=tmp_path)
    assert sorted(export.tensors) == ["base_model.model.model.embed_tokens.lora_embedding_A",
                                      "base_model.model.model.embed_tokens.lora_embedding_B"]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, IDS), expected, rtol=0, atol=ATOL)


def test_composed_adapters_concatenate_ranks(tmp_path):
    """HRA, HRA, LoRA, MTLoRA active together: W·H₁·H₂ + Δ₁ + Δ₂, the second HRA's B from W·H₁."""
    model = get_adapter_model(tiny_llama(), ADAPTERS["hra"].config_class(r=2, target_modules=["q_proj", "v_proj"]),
                              "h1")
    model.add_adapter("h2", ADAPTERS["hra"].config_class(r=4, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], use_rslora=True))
    model.add_adapter("mt", ADAPTERS["mtlora"].config_class(r=2, target_modules=["v_proj"], structure="ctcm"))
    for seed, name in enumerate(("h1", "h2", "lora", "mt")):
        perturb(model, name, seed)
    model.set_adapter(["lora", "h1", "mt", "h2"])
    expected = outputs(model, IDS)
    for single in ("h1", "h2"):  # each part matters
        model.set_adapter([n for n in ("lora", "h1", "mt", "h2") if n != single])
        assert (outputs(model, IDS) - expected).abs().max() > CHANGED
    model.set_adapter(["lora", "h1", "mt", "h2"])
    export = model.to_lora(save_directory=tmp_path)
    ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0]
             for k, v in export.tensors.items() if ".lora_A" in k}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 + 4 + 2 and ranks["model.layers.0.self_attn.o_proj"] == 4
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, IDS), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_trained_biases_and_modules_to_save_are_carried(method, tmp_path):
    config = ADAPTERS[method].config_class(r=2, target_modules=["query", "value"], bias=f"{method}_only",
                                           modules_to_save=["classifier"])
    model = get_adapter_model(tiny_bert(), config)
    perturb(model, "default")
    with torch.no_grad():
        moved = [p for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n]
        assert len(moved) == 2 + 2 + 2  # query and value biases, the classifier copy's weight and bias
        for p in moved:
            p.add_(0.5)
    options = merge_options(model, ["default"])
    expected = reference(model, IDS, options)
    assert model.to_lora(save_directory=tmp_path, **options).config["bias"] == "lora_only"
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, IDS), expected, rtol=0, atol=ATOL)


# -- refusals ----------------------------------------------------------------------------------------------------
def test_hydralora_with_its_router_is_refused_with_the_fixed_mixture_option():
    model = get_adapter_model(tiny_bert(), HydraLoraConfig(r=2, num_heads=3, target_modules=["query"]))
    with pytest.raises(UnsupportedError, match=r"router is not a LoRA.*head_weights.*--head-weights "
                                               r"0.3333,0.3333,0.3333") as error:
        model.to_lora()
    assert "bert.encoder.layer.0.attention.self.query" in str(error.value)
    with pytest.raises(MergeError, match="must sum to 1"):
        model.to_lora(head_weights=[0.5, 0.6, 0.0])


def test_merged_adapters_unknown_options_and_dilated_convolutions_are_refused():
    model = get_adapter_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(MergeError, match=r"option\(s\) \['head_weights'\] are not used"):
        model.to_lora(head_weights=[1.0])
    with pytest.raises(MergeError, match="no adapter named 'other'"):
        model.to_lora("other")
    model.merge()
    with pytest.raises(MergeError, match="merged into its weight; call unmerge"):
        model.to_lora()
    convs = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    for index in ("0", "1"):
        conv_model = get_adapter_model(copy.deepcopy(convs), LoraConfig(r=2, target_modules=[index]))
        with pytest.raises(UnsupportedError, match=rf"cannot export {index} as LoRA: it is a Conv2d with dilation"):
            conv_model.to_lora()


def error_line(capsys) -> str:
    """The one error line of a bad-input exit (after any loading bars of transformers), without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_cli_exports_hydralora_only_with_head_weights(tmp_path, capsys):
    from conftest import save_tiny_classifier
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    save_tiny_classifier(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_adapter_model(base, HydraLoraConfig(r=2, num_heads=2, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    perturb(model, "default", scale=1.0)
    model.save_pretrained(tmp_path / "run")
    args = ["export", "--adapter", str(tmp_path / "run"), "--format", "lora", "--out", str(tmp_path / "lora")]
    assert main(args) == 2
    assert error_line(capsys).startswith("peftlab export: error: cannot export adapter 'default'")
    assert main([*args, "--head-weights", "0.25,0.75"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    ids = tokenizer(["a slow old film"], return_tensors="pt").input_ids
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    expected = reference(model, ids, {"head_weights": [0.25, 0.75]})
    assert (expected - outputs(fresh, ids)).abs().max() > CHANGED
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    torch.testing.assert_close(outputs(loaded, ids), expected, rtol=0, atol=ATOL)
    assert main(["export", "--adapter", str(tmp_path / "run"), "--head-weights", "1", "--out",
                 str(tmp_path / "peft")]) == 2
    assert "apply to --format lora only" in error_line(capsys)


# -- diffusers pipelines ---------------------------------------------------------------------------------------------
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    pytest.importorskip("diffusers")
    from peftlab.diffusion.pipeline import load_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder, load_pipeline(folder)


def pipeline_outputs(pipe) -> torch.Tensor:
    """The UNet's noise prediction, the text encoder's states and the latents after 2 DDIM steps, flattened."""
    g = torch.Generator().manual_seed(0)
    sample, states = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    start = torch.randn(1, 4, 16, 16, generator=g)
    ids = pipe.tokenizer([PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():
        unet = pipe.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=states, return_dict=False)[0]
        text = pipe.text_encoder(ids).last_hidden_state
        latents = pipe(PROMPT, num_inference_steps=2, guidance_scale=2.0, latents=start.clone(),
                       output_type="latent").images
    return torch.cat([unet.flatten(), text.flatten(), latents.flatten()])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_pipeline_export_loads_with_diffusers_load_lora_weights(method, sd_base, tmp_path):
    from peftlab.diffusion.pipeline import add_pipeline_adapters, pipeline_adapters, save_pipeline_adapters

    base_dir, loaded = sd_base
    pipe = copy.deepcopy(loaded)
    config_cls = ADAPTERS[method].config_class
    models = add_pipeline_adapters(pipe, {"unet": config_cls(r=2), "text_encoder": config_cls(r=2)})
    for seed, model in enumerate(models.values()):  # a larger move makes the tiny random UNet ill-conditioned:
        perturb(model, "default", seed, scale=0.1)  # fp32 rounding then grows past 1e-4 (peftlab's merge too)
    options = merge_options(models["unet"], ["default"])
    for model in pipeline_adapters(pipe).values():
        model.merge(**options)  # the reference: peftlab's forward, or its merge with the same fixed mixture
    expected = pipeline_outputs(pipe)
    for model in pipeline_adapters(pipe).values():
        model.unmerge()
    assert (expected - pipeline_outputs(loaded)).abs().max() > CHANGED
    save_pipeline_adapters(pipe, tmp_path / "run")
    extra = ["--head-weights", ",".join(str(w) for w in options["head_weights"])] if options else []
    assert main(["export", "--adapter", str(tmp_path / "run"), "--format", "lora", "--out", str(tmp_path / "lora"),
                 *extra]) == 0
    fresh = copy.deepcopy(loaded)
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(pipeline_outputs(fresh), expected, rtol=0, atol=ATOL)
    unet = peft.PeftModel.from_pretrained(copy.deepcopy(loaded.unet), tmp_path / "lora" / "unet")
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = unet.base_model.model(sample, torch.tensor([10]), encoder_hidden_states=torch.ones(1, 7, 32))[0]
        want = fresh.unet(sample, torch.tensor([10]), encoder_hidden_states=torch.ones(1, 7, 32))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_pipeline_export_refuses_what_a_diffusers_lora_file_cannot_hold(sd_base, tmp_path):
    from peftlab.diffusion.pipeline import add_pipeline_adapters, to_lora_pipeline

    pipe = copy.deepcopy(sd_base[1])
    add_pipeline_adapters(pipe, {"unet": LoraConfig(r=2, bias="lora_only")})
    with pytest.raises(UnsupportedError, match=r"the unet adapter trains .*bias.*diffusers' LoRA files cannot hold"):
        to_lora_pipeline(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
