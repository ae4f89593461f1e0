"""The generators, by their generator.kind names.

A generator is an nn.Module built as ``Generator(text_dim, config)`` from its own config class (its ``Config``
attribute, next to it in its file), with the attributes of amortized3d.interfaces.Generator. A new generator is a
new file here and one entry in GENERATORS; the config's generator.kind choices and its generator section's fields
come from this mapping.
"""

from amortized3d.generators.conv3d import Conv3DGenerator
from amortized3d.generators.gaussians import PromptGaussians
from amortized3d.generators.hyper_ingp import HyperINGP
from amortized3d.generators.ngp import PromptNGP
from amortized3d.generators.triplane import TriplaneTransformer

# ngp: not a generator of many prompts but the Instant-NGP field of one (per-prompt runs: corpus "prompt:TEXT")
GENERATORS = {"hyper_ingp": HyperINGP, "conv3d": Conv3DGenerator, "triplane": TriplaneTransformer, "ngp": PromptNGP,
              "gaussians": PromptGaussians}
PER_PROMPT = ("ngp", "gaussians")  # the representations of one prompt (a per-prompt run's: corpus prompt:TEXT)

__all__ = ["GENERATORS", "PER_PROMPT", "Conv3DGenerator", "HyperINGP", "PromptGaussians", "PromptNGP", "TriplaneTransformer"]
