"""diffquant: post-training quantization of diffusion models, with real low-bit checkpoints and
honest metrics.

    import diffquant as dq
    model, scheduler = dq.load("mnist-unet")
    calib = dq.calibrate.collect(model, scheduler, n=64)
    dq.quantize_(model, dq.get_recipe("w4a8"), calib=calib)
    dq.save(model, "runs/unet-w4a8", scheduler)
"""

from diffquant import (
           _quiet,  # noqa: F401  (first: before anything imports diffusers)
           methods,  # noqa: F401  (dq.methods.aquatic)
)
from diffquant import calibration as calibrate  # noqa: F401  (dq.calibrate.collect)
from diffquant.calibration.collect import CalibrationData, collect
from diffquant.checkpoint import save
from diffquant.config import RECIPES, AQConfig, QuantConfig, WeightConfig, get_recipe
from diffquant.models import load
from diffquant.nn.act import ActSpec
from diffquant.pipelines import balanced_labels, sample
from diffquant.quantize import quantize_

__version__ = "0.1.0"

__all__ = ["RECIPES", "AQConfig", "ActSpec", "CalibrationData", "QuantConfig", "WeightConfig", "balanced_labels",
           "calibrate", "collect", "get_recipe", "load", "methods", "quantize_", "sample", "save"]
