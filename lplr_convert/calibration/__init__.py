"""Calibration statistics: input second moments H = E[x x^T] of every block linear, computed block by block."""

from .run import calibrate
from .stats import CalibrationStats, load_calibration

__all__ = ["CalibrationStats", "calibrate", "load_calibration"]
