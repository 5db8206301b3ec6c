"""Adapter methods. Importing this package registers every built-in method."""

from peftlab.methods import hra, hydralora, lora  # noqa: F401  (registration side effects)
