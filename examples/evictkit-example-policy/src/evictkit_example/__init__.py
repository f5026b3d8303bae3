"""An example third-party evictkit policy package (see key_norm.py)."""

from evictkit_example.key_norm import KeyNorm

__all__ = ["KeyNorm"]
