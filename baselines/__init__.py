"""Baselines with the controllers' protocol (`agents.base.Controller`): see `baselines.knobs`."""
from .knobs import BASELINES, KnobPathController, knob_path, make_baselines

__all__ = ["BASELINES", "KnobPathController", "knob_path", "make_baselines"]
