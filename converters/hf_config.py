"""A transformers config without importing transformers, when config.json spells it all out.

Building a family's routing descriptors needs a dozen config fields. `AutoConfig` supplies
them, defaults included, but importing it costs ~2.4 s here (it pulls in torch and scans every
model package): longer than copying a 2 GB checkpoint. `save_pretrained` writes every field
that is specific to a family's config class, so config.json alone usually has all of them.

`with_config` therefore first tries the plain JSON (`RawConfig`), which refuses to guess: a
field that is absent or null (where the config class might fill a default or derive a value)
stops that attempt, as does any other error, and the whole computation reruns on the real
`AutoConfig`. The tests check, family by family, that both give the same descriptors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class NeedsFullConfig(Exception):
    """Raised (deliberately not an AttributeError, so that `getattr(cfg, x, default)` and
    `hasattr` cannot swallow it) when config.json does not settle a field by itself."""


# Fields the family table reads with `getattr(cfg, name, default)` because many config classes
# do not have them at all. For these, absence from config.json is an AttributeError (the
# default applies, exactly as with AutoConfig on a class without the field): save_pretrained
# writes every field a config class defines beyond PretrainedConfig's own, which
# tests/test_hf_config.py checks for every supported family. (A file saved before a newer
# transformers added one of them to its class would lack it; the table's defaults are the
# values those classes use.)
OPTIONAL_FIELDS = frozenset({"router_jitter_noise", "input_jitter_noise", "router_aux_loss_coef",
                             "router_dtype", "mlp_bias", "use_bias", "hidden_act"})


class RawConfig:
    """config.json's fields as attributes; nested `*_config` objects (a multimodal model's
    `text_config`) likewise. `quantization_config` stays a dict, as transformers keeps it."""

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._data and name in OPTIONAL_FIELDS:
            raise AttributeError(name)
        value = self._data.get(name)
        if value is None:
            raise NeedsFullConfig(name)
        if isinstance(value, dict) and name.endswith("_config") \
                and name != "quantization_config":
            return RawConfig(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)


def with_config(root: Path, config: dict[str, Any], use: Callable[[Any], T], *,
                light: bool = True) -> T:
    """`use(cfg)` with the JSON-only config when it settles everything `use` reads, else (or
    with `light=False`) with transformers' `AutoConfig.from_pretrained(root)`."""
    if light:
        try:
            return use(RawConfig(config))
        except Exception:  # anything unsettled or surprising: the real config decides
            pass
    from transformers import AutoConfig

    return use(AutoConfig.from_pretrained(str(root)))
