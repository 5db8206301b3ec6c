"""HF PEFT interop for users: load an adapter folder that PEFT's ``save_pretrained`` wrote.

``AdapterModel.from_pretrained`` reads PEFT folders too, and ``save_pretrained(format="peft")`` writes them;
the translation itself is the pure converters of :mod:`peftlab.peft_format`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from peftlab import files, peft_format
from peftlab.errors import AdapterLoadError
from peftlab.model import AdapterModel


def load_peft_adapter(
    base_model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> AdapterModel:
    """Wrap ``base_model`` with an adapter saved by HF PEFT's ``save_pretrained`` (methods PEFT has too).

    The same as ``AdapterModel.from_pretrained``, which reads PEFT folders too; this name refuses a folder
    that PEFT did not write.
    """
    data = files.read_json(Path(path) / files.CONFIG_NAME)
    if not peft_format.is_peft_config(data):
        raise AdapterLoadError(f"{path} is not a PEFT adapter (no peft_type); use AdapterModel.from_pretrained")
    return AdapterModel.from_pretrained(base_model, path, adapter_name, is_trainable=is_trainable)


__all__ = ["load_peft_adapter"]
