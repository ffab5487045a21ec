"""cecai-converter: Hugging Face model repositories to verified, quantized GGUF files for llama-cpp-python."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
