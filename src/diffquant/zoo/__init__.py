"""The built-in models (`dq.zoo.load("mnist-unet")`)."""

from diffquant.zoo.registry import ZOO, spec


def load(name: str):
    """(denoiser, scheduler) of a zoo model; see diffquant.models.load."""
    from diffquant.models import load as _load

    return _load(name)


__all__ = ["ZOO", "load", "spec"]
