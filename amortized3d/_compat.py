"""Import guard for torchvision on CPU-only torch builds.

open-clip-torch and timm pull a torchvision wheel; on a machine whose torch is the CPU build
while the torchvision wheel is a CUDA build, ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist`` while registering its fake ops,
and transformers and diffusers, which import torchvision when it is installed, fail with it.
``import_torchvision_safely`` retries such a failed import without those op registrations
(torchvision.transforms works, torchvision.ops does not). Where torchvision imports normally,
as on GPU machines with matching wheels, it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def import_torchvision_safely() -> None:
    """Import torchvision if installed; on the missing-operator error, import it without its op registrations."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "does not exist" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
