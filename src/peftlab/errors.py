"""Every error peftlab raises for bad input derives from :class:`PeftlabError`.

Catch ``PeftlabError`` to handle any of them; catch a subclass for one kind. Each also derives from the
built-in type it replaced (``ValueError`` / ``RuntimeError``), so ``except ValueError`` keeps working.
The message always says what was wrong and what to do; the CLI prints it as one line with exit code 2.

| error             | raised when                                                              |
|-------------------|--------------------------------------------------------------------------|
| ConfigError       | a config field has a bad value (the field is named)                      |
| TargetError       | ``target_modules`` / ``modules_to_save`` match nothing or the wrong type |
| AdapterError      | an adapter name is unknown, taken, or the adapters cannot be combined    |
| MergeError        | merging would give an invalid weight, or the merge state forbids it      |
| AdapterLoadError  | an adapter folder is missing, corrupt or does not fit the model          |
| DataError         | a data set cannot be fetched, read or understood                         |
| ModelError        | a model name or path cannot be resolved or loaded                        |
| RecipeError       | bad options, data or output folder for a training / evaluation recipe    |
| UnsupportedError  | a valid request peftlab (or HF PEFT's format) cannot do, e.g. DoRA, IA3  |
| ReportError       | ``peftlab report`` got a folder that is no run, comparison or analysis   |
| UsageError        | bad command-line input                                                   |
"""

from __future__ import annotations


class PeftlabError(Exception):
    """Base of every peftlab error caused by bad input or state; the message says what to do."""


class ConfigError(PeftlabError, ValueError):
    """A configuration value is invalid; the message says which field and what is allowed."""


class TargetError(PeftlabError, ValueError):
    """The modules a config names do not exist in the model, or cannot carry the adapter."""


class AdapterError(PeftlabError, ValueError):
    """An adapter name is unknown or taken, or the requested adapters cannot be combined."""


class MergeError(PeftlabError, RuntimeError):
    """Merging would produce an invalid weight, or the merge state does not allow the operation."""


class AdapterLoadError(PeftlabError, ValueError):
    """An adapter folder is missing, corrupt, or does not fit the model it is loaded into."""


class DataError(PeftlabError, ValueError):
    """A data set could not be fetched, read or understood; the message says what to do."""


class ModelError(PeftlabError, ValueError):
    """A model name or path could not be resolved or loaded; the message says what to do."""


class RecipeError(PeftlabError, ValueError):
    """Bad input to a recipe (options, data or output folder); the message says what to do."""


class UnsupportedError(PeftlabError, NotImplementedError):
    """A valid request that peftlab (or the target format) does not support; the message names the feature."""


class ReportError(PeftlabError, ValueError):
    """A folder given to ``peftlab report`` is no finished run, comparison or analysis, or its results are corrupt."""


class UsageError(PeftlabError, ValueError):
    """Bad command-line input (reported as one line, exit code 2)."""
