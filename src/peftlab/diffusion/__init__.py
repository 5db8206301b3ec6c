"""Image generation: peftlab adapters on diffusers pipelines (Stable Diffusion's UNet and CLIP text encoder).

```python
from peftlab.diffusion import load_pipeline, add_pipeline_adapters, save_pipeline_adapters
pipe = load_pipeline("path/to/stable-diffusion-v1-5")          # any diffusers pipeline folder
add_pipeline_adapters(pipe, {"unet": HRAConfig(r=8), "text_encoder": HRAConfig(r=8)})  # PEFT's HRA targets
```

``pipeline`` (adapters on the components, one folder per pipeline, merge, PEFT export), ``tokenizer``
(OpenAI CLIP's BPE, offline), ``control`` / ``conditioning`` (control maps; the condition encoder hooked onto the
UNet's ``conv_in``), ``embedded`` (the offline ``tiny-digits`` model) and ``image_metrics``. The training recipes
are :mod:`peftlab.recipes.image.subject_driven` and :mod:`peftlab.recipes.image.controllable`.
Nothing heavy is imported until a name is used: diffusers loads lazily.
"""

from __future__ import annotations

from typing import Any

_PIPELINE_NAMES = (
    "DEFAULT_TARGETS", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "add_pipeline_adapters", "default_targets",
    "load_pipeline", "load_pipeline_adapters", "merge_pipeline", "pipeline_adapters", "save_pipeline_adapters",
    "with_control_encoder",
)


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_NAMES:
        from peftlab.diffusion import pipeline

        return getattr(pipeline, name)
    if name == "clip_tokenizer":
        from peftlab.diffusion.tokenizer import clip_tokenizer

        return clip_tokenizer
    raise AttributeError(f"module 'peftlab.diffusion' has no attribute {name!r}")


__all__ = [*_PIPELINE_NAMES, "clip_tokenizer"]
