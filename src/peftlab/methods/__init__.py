"""Adapter methods. Importing this package registers every built-in method."""

from peftlab.methods import hra, hydralora, lora, mtlora  # noqa: F401  (registration side effects)
