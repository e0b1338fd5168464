"""Loading denoisers: zoo names, zoo-style folders, plain diffusers model or pipeline folders, and
folders written by `diffquant quantize`. Nothing is ever downloaded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from diffquant.zoo.registry import CHECKPOINT_DIR, SCHEDULER_CONFIG, ZOO, ZooSpec

MODEL_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
META_FILE = "diffquant.json"


class ModelLoadError(RuntimeError):
    """A MODEL argument names no model that can be loaded."""


@dataclass
class ModelMeta:
    """What sampling needs to know beyond the diffusers config."""

    name: str
    num_classes: int = 10
    null_class: int = 10
    space_to_depth: int = 1
    guidance_scale: float = 2.0
    image_size: int = 32
    image_channels: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def build(spec: ZooSpec) -> torch.nn.Module:
    """A freshly initialised model of a zoo spec."""
    model = MODEL_CLASSES[spec.cls](**spec.config)
    model.dq_meta = meta_from_spec(spec)
    return model


def meta_from_spec(spec: ZooSpec) -> ModelMeta:
    return ModelMeta(name=spec.name, space_to_depth=spec.space_to_depth, guidance_scale=spec.guidance_scale)


def make_scheduler(config: dict | None = None) -> DDIMScheduler:
    return DDIMScheduler.from_config(dict(config or SCHEDULER_CONFIG))


def ddpm_from(scheduler) -> DDPMScheduler:
    return DDPMScheduler.from_config(scheduler.config)


def resolve(model: str) -> Path:
    """A zoo name or a path to the folder that holds it."""
    if model in ZOO:
        path = CHECKPOINT_DIR / model
        if not (path / META_FILE).exists():
            raise ModelLoadError(
                f"Zoo model {model!r} has no trained checkpoint at {path}. "
                f"Fix: run `diffquant zoo train {model}`."
            )
        return path
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(
            f"{model!r} is neither a zoo model ({', '.join(sorted(ZOO))}) nor an existing path. "
            "Fix: give a zoo name, or the folder of a diffusers model, pipeline, or `diffquant quantize` output."
        )
    return path


def _denoiser_dir(path: Path) -> Path:
    for sub in ("denoiser", "unet", "transformer", "."):
        cfg = path / sub / "config.json"
        if cfg.exists():
            cls = json.loads(cfg.read_text()).get("_class_name")
            if cls in MODEL_CLASSES:
                return path / sub
            raise ModelLoadError(
                f"{cfg} describes a {cls!r}; diffquant loads {', '.join(MODEL_CLASSES)} denoisers."
            )
    raise ModelLoadError(
        f"{path} holds no model: expected a config.json of a diffusers UNet2DModel or "
        "DiTTransformer2DModel there or in a unet/, transformer/ or denoiser/ subfolder. "
        "Fix: point MODEL at a diffusers model or pipeline folder, a zoo name, or a `diffquant quantize` output."
    )


def _scheduler_config(path: Path) -> dict:
    for p in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if p.exists():
            return json.loads(p.read_text())
    return dict(SCHEDULER_CONFIG)


def load(model: str | Path) -> tuple[torch.nn.Module, DDIMScheduler]:
    """(denoiser in eval mode, DDIM scheduler). Quantized folders come back quantized."""
    path = resolve(str(model))
    if path.is_file():
        raise ModelLoadError(
            f"{path} is a file; MODEL must be a zoo name or a folder (a diffusers model or pipeline "
            "folder, or the output folder of `diffquant quantize`)."
        )
    meta_raw = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    den_dir = _denoiser_dir(path)
    cls_name = json.loads((den_dir / "config.json").read_text())["_class_name"]
    cls = MODEL_CLASSES[cls_name]
    if "quantization" in meta_raw:
        from diffquant.serialization import load_quantized

        den = load_quantized(path, cls.from_config(cls.load_config(den_dir)), meta_raw["quantization"])
    else:
        try:
            den = cls.from_pretrained(den_dir, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"Could not read the weights in {den_dir}: {e}") from None
    den.eval()
    meta = meta_raw.get("meta")
    den.dq_meta = ModelMeta(**meta) if meta else default_meta(den, path.name)
    return den, make_scheduler(_scheduler_config(path))


def default_meta(model: torch.nn.Module, name: str) -> ModelMeta:
    """Meta for a plain diffusers model: classes from its label embedding, null class last."""
    cfg = model.config
    n = int(cfg.num_class_embeds or 1) - 1 if isinstance(model, UNet2DModel) else int(cfg.num_embeds_ada_norm)
    return ModelMeta(name=name, num_classes=n, null_class=n, image_size=cfg.sample_size,
                     image_channels=cfg.in_channels)


def meta_of(model: torch.nn.Module) -> ModelMeta:
    meta = getattr(model, "dq_meta", None)
    return meta if meta is not None else default_meta(model, type(model).__name__)


def save_fp(model: torch.nn.Module, scheduler, out: Path, extra: dict | None = None) -> None:
    """Writes a zoo-style folder: denoiser/ (diffusers format), scheduler/, diffquant.json."""
    model.save_pretrained(out / "denoiser", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    meta = {"meta": meta_of(model).to_dict(), **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def to_model_space(images: torch.Tensor, space_to_depth: int) -> torch.Tensor:
    """Images to the denoiser's input space (pixel-unshuffle for the zoo U-Net's 'latent')."""
    return F.pixel_unshuffle(images, space_to_depth) if space_to_depth > 1 else images


def from_model_space(latents: torch.Tensor, space_to_depth: int) -> torch.Tensor:
    return F.pixel_shuffle(latents, space_to_depth) if space_to_depth > 1 else latents
