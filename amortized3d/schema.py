"""The base of every configuration model (pydantic): strict types, finite numbers, no unknown keys.

The experiment config's sections (amortized3d/config.py) and the configs that generators and priors own
(HyperINGPConfig next to HyperINGP, ...) derive from ConfigModel. Each field carries its type, its choices
(a Literal) and its range (Field(ge=..., le=..., gt=..., lt=...), on the elements for lists):

    steps: Int = Field(50000, ge=1, le=1_000_000_000)
    fovy_range: list[Annotated[float, Field(gt=0, lt=180)]] = [40.0, 70.0]

Types are strict: a bool field takes only true/false, a string field only strings, a float field a number
(an int becomes a float) and an ``Int`` field an integer, or an integral float (1e3 and 1000.0 are 1000).
An optional hint for error messages sits in ``json_schema_extra={"hint": ...}``.
"""

from __future__ import annotations

import math
from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict


class ConfigModel(BaseModel):
    """A config section: unknown keys, wrong types and non-finite floats are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    def part(self, config_class: type[Part]) -> Part:
        """The values of this config's fields that ``config_class`` has, as a ``config_class`` (e.g. the HyperINGPConfig
        of the experiment's flat ``generator:`` section)."""
        return config_class.model_validate({name: getattr(self, name) for name in config_class.model_fields})


Part = TypeVar("Part", bound=ConfigModel)


def _integral_float_to_int(value):
    """1e3 and 1000.0 -> 1000 (YAML reads 1e3 as a float); anything else is left for the int check."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral_float_to_int)]
