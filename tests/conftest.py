"""Shared fixtures: small randomly initialised models that build in milliseconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*PEFT.*")

# When bit-exact holds, and when it does not. The same float32 computation on the same values at the same memory
# alignment gives the same bits on one machine (one process, one thread count), so tests compare such results
# with rtol=0, atol=0. Equal values held at OTHER alignments do not: tensors read from a safetensors file (a base
# loaded by from_pretrained, an adapter loaded with low_cpu_mem_usage=True) sit at 8-byte, not 64-byte, aligned
# addresses, and MKL / oneDNN choose their kernel (and so the order of each sum) by alignment on some CPUs: on a
# 2-core AMD EPYC a tiny UNet's output moved by 2.6e-06 and 2-step latents by 7.3e-06, on Intel Xeons by 0.
# Outputs computed from such tensors are compared within float32 rounding of a few ulps per layer:
OTHER_MEMORY = {"rtol": 1e-5, "atol": 1e-5}


def assert_same_greedy(got: torch.Tensor, want: torch.Tensor, scores: tuple[torch.Tensor, ...], margin: float) -> None:
    """Two greedy generations of one prompt batch agree up to float rounding of their logits (within ``margin``).

    ``want`` and ``scores`` come from ``generate(..., output_scores=True, return_dict_in_generate=True)`` of the
    reference model. Tokens must be equal, except that a row may part from the reference at a step where the
    reference's two best logits lie within ``margin`` of each other (a near tie that rounding may break either
    way); after that its tokens follow another prefix and are not compared.
    """
    assert got.shape == want.shape
    start = want.shape[1] - len(scores)
    for row in range(want.shape[0]):
        for step, step_scores in enumerate(scores):
            if got[row, start + step] != want[row, start + step]:
                best, second = step_scores[row].float().topk(2).values.tolist()
                lead = best - second
                assert lead < margin, f"row {row} parts at step {step}, where the best logit led by {lead:.3g}"
                break


def free_port() -> str:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun / accelerate launch rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run_process_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher (torchrun, accelerate launch) in a session of its own and wait at most ``timeout`` s; the
    launcher and every worker it started are killed when it is over, so a failed test leaves no orphan behind."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def tiny_bert(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def tiny_sd_pipeline(unet_widths: tuple[int, ...] = (32, 64), vae_widths: tuple[int, ...] = (32, 64),
                     norm_groups: int = 32, latent_size: int = 16, image_size: int = 32):
    """A random StableDiffusionPipeline (UNet, VAE with scale factor 2, CLIP text encoder hidden 32, the real CLIP
    tokenizer), small enough to run 2 denoising steps in well under a second; the same arguments give the same
    weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from peftlab.diffusion.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=unet_widths, layers_per_block=1, sample_size=latent_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=norm_groups)
    vae = AutoencoderKL(block_out_channels=list(vae_widths), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=norm_groups, sample_size=image_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 100, (3, 11), generator=g),
        "attention_mask": torch.ones(3, 11, dtype=torch.long),
    }


KEYWORD_WORDS = "the a movie film plot actor story scene music long short slow fast old new".split()


def write_keyword_csv(path, rows: int, seed: int = 0, labels: dict[int, str] | None = None):
    """Six random words per row; label 1 rows also contain 'excellent'; ``labels`` replaces the label of some rows."""
    import random

    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        words = [rng.choice(KEYWORD_WORDS) for _ in range(6)]
        if i % 2:
            words.insert(rng.randrange(6), "excellent")
        lines.append(f"{' '.join(words)},{(labels or {}).get(i, i % 2)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_classifier(folder) -> None:
    """A 2-layer, hidden-32 BERT classifier with the MiniLM tokenizer, saved like a hub checkpoint
    (``initializer_range=0.1``: with the default 0.02 the attention passes almost no signal in a few steps)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftlab.base_models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_lm(folder, texts: list[str], vocab_size: int) -> None:
    """A 2-layer GPT-2 (hidden 32) and a byte-level BPE tokenizer trained on ``texts``, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class Crash(Exception):
    """Raised by a test's patched step to stop a run as a crash would."""


def crash_at_checkpoint(monkeypatch, run, step: int) -> None:
    """``run()`` (an image-recipe training) stops with :class:`Crash` right after writing its step-``step``
    checkpoint, as a killed run would; the patch is undone after."""
    import pytest

    from peftlab.recipes.image import training as image_training

    save = image_training.save_checkpoint

    def crash_after(out, at, *rest, **kwargs):
        folder = save(out, at, *rest, **kwargs)
        if at == step:
            raise Crash
        return folder

    monkeypatch.setattr(image_training, "save_checkpoint", crash_after)
    try:
        with pytest.raises(Crash):
            run()
    finally:
        monkeypatch.undo()


def saved_tiny_sd(tmp_path_factory, image_size: int = 16):
    """A folder holding the image recipes' test pipeline (16-px images, 8×8 latents), saved like a hub model."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(unet_widths=(16, 32), vae_widths=(8, 16), norm_groups=8, latent_size=image_size // 2,
                     image_size=image_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """:func:`saved_tiny_sd` once per test session (every image test only reads it)."""
    return saved_tiny_sd(tmp_path_factory)


# The image recipes' fastest CLI settings (tests/test_image_recipes.py, tests/test_controlnet.py).
FAST_IMAGE_ARGS = ["--inference-steps", "2", "--num-eval-images", "2", "--batch-size", "2", "--r", "2"]
