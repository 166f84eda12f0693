"""Files shipped inside the package (LLM-Adapters' data), found the same way from a checkout or a wheel."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def bundled(*parts: str) -> Path:
    """A path under the bundled resources, e.g. bundled("llm-adapters", "dataset")."""
    return Path(str(files(__name__).joinpath(*parts)))


LLM_ADAPTERS = bundled("llm-adapters")
