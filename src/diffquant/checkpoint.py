"""Saving a quantized model as a folder that every command accepts as MODEL."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from diffquant.accounting import bit_report
from diffquant.io_utils import write_dir_atomic
from diffquant.models import META_FILE, make_scheduler, meta_of
from diffquant.provenance import provenance
from diffquant.serialization import WEIGHTS_FILE, quant_map, save_quantized


def save(model: nn.Module, path: str | Path, scheduler=None, source: str | None = None,
         extra: dict | None = None, overwrite: bool = True) -> Path:
    """Writes DIR/ with denoiser/config.json, scheduler/, quantized.safetensors and diffquant.json
    (the JSON map, the recipe, the bit accounting). Atomic: DIR appears complete or not at all."""
    recipe = getattr(model, "dq_recipe", None)
    if recipe is None:
        raise ValueError("model is not quantized (no recipe attached); use diffquant.quantize_ first")

    def fill(tmp: Path) -> None:
        model.save_config(tmp / "denoiser")
        (scheduler or make_scheduler()).save_pretrained(tmp / "scheduler")
        nbytes = save_quantized(model, tmp)
        bits = bit_report(model)
        meta = {
            "meta": meta_of(model).to_dict(),
            "source": source,
            "quantization": {"recipe": recipe.to_dict(), "layers": quant_map(model)},
            "effective_bits": bits["effective_bits"],
            "checkpoint_bytes": nbytes,
            "unquantized_weight_layers": bits["unquantized_weight_layers"],
            **(extra or {}),
            **provenance(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return write_dir_atomic(path, fill, overwrite=overwrite)


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weights file of a model folder (quantized or diffusers fp32)."""
    p = Path(path)
    for f in (p / WEIGHTS_FILE, p / "denoiser" / "diffusion_pytorch_model.safetensors"):
        if f.exists():
            return f.stat().st_size
    raise FileNotFoundError(f"no weights file in {p}")
