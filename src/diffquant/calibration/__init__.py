"""Calibration: timestep-aware collection of layer inputs along the FP sampling trajectory."""

from diffquant.calibration.collect import CalibrationData, collect

__all__ = ["CalibrationData", "collect"]
