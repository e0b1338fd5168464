"""Quantization methods that go beyond one-shot formats: AQUATIC-Diff (aquatic)."""

from diffquant.methods import aquatic  # noqa: F401
