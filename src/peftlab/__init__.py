"""peftlab: parameter-efficient fine-tuning with HRA, HydraLoRA, MTLoRA and LoRA.

```python
from peftlab import HRAConfig, get_adapter_model
model = get_adapter_model(base_model, HRAConfig(r=8, target_modules=["query", "value"]))
```
"""

from peftlab._version import __version__
from peftlab.config import AdapterConfig, register_method
from peftlab.errors import (
    AdapterError,
    AdapterLoadError,
    ConfigError,
    DataError,
    MergeError,
    ModelError,
    PeftlabError,
    RecipeError,
    ReportError,
    TargetError,
    UnsupportedError,
)
from peftlab.inject import AdapterLayer
from peftlab.interop import load_peft_adapter
from peftlab.matching import component_targets
from peftlab.methods.hra import HRAConfig
from peftlab.methods.hydralora import HydraLoraConfig
from peftlab.methods.lora import LoraConfig
from peftlab.methods.mtlora import MTLoraConfig
from peftlab.model import AdapterModel, get_adapter_model

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterModel",
    "ConfigError",
    "DataError",
    "HRAConfig",
    "HydraLoraConfig",
    "LoraConfig",
    "MTLoraConfig",
    "MergeError",
    "ModelError",
    "PeftlabError",
    "RecipeError",
    "ReportError",
    "TargetError",
    "UnsupportedError",
    "Trainer",
    "__version__",
    "component_targets",
    "estimate_num_heads",
    "get_adapter_model",
    "load_peft_adapter",
    "register_method",
]


def __getattr__(name: str):
    if name == "estimate_num_heads":  # imported lazily: it pulls in scikit-learn
        from peftlab.data.clusters import estimate_num_heads

        return estimate_num_heads
    if name == "Trainer":  # imported lazily: transformers' Trainer is slow to import
        from peftlab.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
