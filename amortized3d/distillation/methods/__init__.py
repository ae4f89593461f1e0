"""The score-distillation methods, one file each, by their distill.method names.

A method is an object with ``default_guidance`` (its guidance scale g when distill.guidance_scale is null),
``learned_branch`` (whether it trains a branch of the prior: amortized3d.distillation.adapters),
``timestep_ceiling(t_range, eta, rule)`` (the largest first timestep it draws) and ``gradient(draw)`` (its
gradient with respect to the rendered images, from one amortized3d.distillation.guidance.Draw). A new method is a
new file here and one line in METHODS.
"""

from amortized3d.distillation.methods.asd import ASD
from amortized3d.distillation.methods.csd import CSD
from amortized3d.distillation.methods.lods import LODS
from amortized3d.distillation.methods.sds import SDS
from amortized3d.distillation.methods.sds_star import SDSStar
from amortized3d.distillation.methods.vsd import VSD

METHODS = {"asd": ASD(), "sds": SDS(), "sds-star": SDSStar(), "csd": CSD(), "vsd": VSD(), "lods-embedding": LODS(), "lods-lora": LODS()}

__all__ = ["METHODS", "ASD", "CSD", "LODS", "SDS", "SDSStar", "VSD"]
