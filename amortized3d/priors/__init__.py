"""The priors, by their prior.kind names.

A prior is built by ``Prior.from_config(cfg, text_encoder, device)`` from the experiment config (its own config
class is its ``Config`` attribute, next to it in its file) and has the attributes of amortized3d.interfaces.Prior.
A new prior is a new file here and one entry in PRIORS; the config's prior.kind choices and its prior section's
fields come from this mapping.
"""

from amortized3d.priors.analytic import AnalyticPrior
from amortized3d.priors.diffusers_prior import DiffusionPrior

PRIORS = {"analytic": AnalyticPrior, "analytic_multiview": AnalyticPrior, "stable_diffusion": DiffusionPrior, "deepfloyd_if": DiffusionPrior,
          "mvdream": DiffusionPrior}

__all__ = ["PRIORS", "AnalyticPrior", "DiffusionPrior"]
