"""Tiny random models built from config (no downloads): the conformance kit's builder."""

from evictkit.specs.tiny import tiny_model

ARCHS = ("llama", "qwen2", "mistral", "gemma")

__all__ = ["ARCHS", "tiny_model"]
