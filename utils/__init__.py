"""Shared building blocks of the language-ticket scripts (one concept per module)."""

from pathlib import Path

# The suite's version (the VERSION file at the top of the repository): written into every model
# card, masks dataset card and results file, so a result names the code that made it.
__version__ = (Path(__file__).resolve().parent.parent / "VERSION").read_text(encoding="utf-8").strip()
