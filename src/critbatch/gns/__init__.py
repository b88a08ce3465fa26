"""The gradient noise scale B_simple (McCandlish et al. 2018) beside the measured CBS."""

from .estimators import NoiseScale, noise_scale_from_estimates, noise_scale_from_norms, two_batch_estimates
from .online import NoiseScaleCallback
from .probe import estimate_noise_scale, measure_norms

__all__ = ["NoiseScale", "estimate_noise_scale", "measure_norms", "noise_scale_from_norms",
           "noise_scale_from_estimates", "two_batch_estimates", "NoiseScaleCallback"]
