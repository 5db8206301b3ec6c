"""The commands that are not training recipes: ``compare``, ``analyze``, ``serve``, ``saved`` (merge, export,
inspect) and ``generate``."""
