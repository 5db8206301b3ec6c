"""OpenAI CLIP's BPE tokenizer, built offline from the vocabulary file ``open-clip-torch`` ships.

``open_clip/bpe_simple_vocab_16e6.txt.gz`` holds CLIP's 48,894 BPE merges. The vocabulary is built from
it exactly as CLIP does (``open_clip.tokenizer.SimpleTokenizer``):

    ids 0-255      the 256 byte symbols (GPT-2's byte → unicode table)
    ids 256-511    the same symbols + ``</w>`` (end of word)
    ids 512-49405  one token per merge, in merge order
    49406, 49407   ``<|startoftext|>``, ``<|endoftext|>``

and written once as ``vocab.json`` / ``merges.txt`` (+ tokenizer config) to ``<cache>/tokenizers/clip-bpe``,
which ``CLIPTokenizer.from_pretrained`` reads with ``model_max_length=77`` (Stable Diffusion's text length;
without it a pipeline's prompt tensors overflow the text encoder's position table).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from peftlab.errors import ModelError, RecipeError

CLIP_MAX_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
PACKAGE = "open-clip-torch==3.3.0"


def vocab_file() -> Path:
    """CLIP's ``bpe_simple_vocab_16e6.txt.gz``, located without importing ``open_clip`` (its imports are heavy)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the CLIP tokenizer needs the vocabulary of {PACKAGE}: pip install --no-deps {PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the package: pip install --no-deps {PACKAGE}")
    return path


def clip_vocabulary(path: Path) -> tuple[dict[str, int], list[str]]:
    """(token → id, merges as "a b" lines) of CLIP's BPE, from its gzipped merges file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer_dir() -> Path:
    """A folder holding CLIP's tokenizer files (written once, atomically, under peftlab's cache)."""
    from peftlab.data.cache import cache_dir
    from peftlab.files import atomic_write_bytes, atomic_write_folder, atomic_write_json

    target = cache_dir() / "tokenizers" / "clip-bpe"
    if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
        return target

    def write(folder: Path) -> None:
        vocab, merges = clip_vocabulary(vocab_file())
        atomic_write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
        atomic_write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
        atomic_write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "do_lower_case": True})

    return atomic_write_folder(target, write, replace=False)


def clip_tokenizer(**kwargs: Any):
    """A ``transformers.CLIPTokenizer`` with OpenAI CLIP's vocabulary and ``model_max_length=77``.

    "a photo of sks dog" → [49406, 320, 1125, 539, 48136, 1929, 49407], as OpenAI CLIP encodes it.
    """
    from transformers import CLIPTokenizer

    from peftlab.base_models import quiet_transformers

    with quiet_transformers():
        return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()),
                                             **{"model_max_length": CLIP_MAX_LENGTH, **kwargs})


def check_prompt(tokenizer: Any, text: str, flag: str) -> None:
    """Refuse a prompt longer than the tokenizer's ``model_max_length`` (the pipeline would cut it silently)."""
    if not text.strip():
        raise RecipeError(f"{flag} is empty; describe the image to generate")
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 100_000:  # "no limit" is a huge sentinel in transformers
        return
    length = len(tokenizer(text, truncation=False).input_ids)
    if length > limit:
        raise RecipeError(f"{flag} is {length} tokens long (with the start and end tokens); the text encoder "
                          f"takes at most {limit}: shorten it")
