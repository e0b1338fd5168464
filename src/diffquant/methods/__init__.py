"""Quantization methods beyond one-shot formats: AQUATIC-Diff's layer-wise search (aquatic), its
per-layer bit allocation (laq) and its SeMI-PV fine-tuning (pv_tuning)."""

from diffquant.methods import aquatic, laq, pv_tuning  # noqa: F401
