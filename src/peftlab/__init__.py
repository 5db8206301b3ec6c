"""peftlab: parameter-efficient fine-tuning with HRA, HydraLoRA, MTLoRA and LoRA.

```python
from peftlab import HRAConfig, get_adapter_model
model = get_adapter_model(base_model, HRAConfig(r=8, target_modules=["query", "value"]))
```
"""

from peftlab._version import __version__
from peftlab.config import AdapterConfig, ConfigError, register_method
from peftlab.inject import AdapterLayer, MergeError
from peftlab.io import AdapterLoadError
from peftlab.methods.hra import HRAConfig
from peftlab.methods.hydralora import HydraLoraConfig
from peftlab.methods.lora import LoraConfig
from peftlab.methods.mtlora import MTLoraConfig
from peftlab.model import AdapterModel, get_adapter_model

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterModel",
    "ConfigError",
    "HRAConfig",
    "HydraLoraConfig",
    "LoraConfig",
    "MTLoraConfig",
    "MergeError",
    "Trainer",
    "__version__",
    "get_adapter_model",
    "register_method",
]


def __getattr__(name: str):
    if name == "Trainer":  # imported lazily: transformers' Trainer is slow to import
        from peftlab.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
