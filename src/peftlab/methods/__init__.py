"""Adapter methods. Importing this package registers every built-in method."""

from peftlab.methods import hra, lora  # noqa: F401, I001  (registration side effects; this order is --help's)
from peftlab.methods import hydralora, mtlora  # noqa: F401
