"""pydetox: remove toxicity from language models by editing their weights, and ship the result as GGUF."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
