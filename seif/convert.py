"""The conversion registry: `seif convert SRC DST` finds its converter here.

Hub and spoke (DESIGN §1): every converter reads or writes SEIF on one side. Converters register
themselves under (source format, destination format); third-party packages do it through the
`seif.converters` entry point group, whose objects are called once with no arguments. The core
never imports a framework: a converter module imports its own framework when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from .errors import ConversionError
from .manifest import MANIFEST_NAME

Converter = Callable[..., Path]
_REGISTRY: dict[tuple[str, str], Converter] = {}
_builtin_loaded = False
_loaded_plugins: set[str] = set()

# File suffix -> format name, for destinations that do not exist yet.
SUFFIX_FORMATS = {".seif": "seif", ".onnx": "onnx", ".msgpack": "flax"}


def register(source: str, destination: str, converter: Converter) -> None:
    """Make `converter(src, dst, **options)` handle `source` -> `destination`."""
    _REGISTRY[(source, destination)] = converter


def _load_plugins(pair: tuple[str, str] | None = None) -> None:
    """Register the built-in seif -> seif converter and the `seif.converters` plugins.

    With `pair` (source, destination format), plugins whose entry point is named after either
    format are loaded first, and the others only if none of those handles the pair: importing
    every converter module costs ~35 ms of a conversion's fixed cost, and it needs one."""
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        from . import convert_seif
        convert_seif.register()
    if pair is not None and pair in _REGISTRY:
        return
    plugins = [ep for ep in entry_points(group="seif.converters")
               if ep.name not in _loaded_plugins]
    if pair is not None:
        named = [ep for ep in plugins if ep.name in pair]
        _load(named)
        if pair in _REGISTRY:
            return
        plugins = [ep for ep in plugins if ep not in named]
    _load(plugins)


def _load(plugins) -> None:
    for ep in plugins:
        _loaded_plugins.add(ep.name)
        try:
            ep.load()()
        except Exception as exc:  # a broken plugin must not break the built-in converters
            import warnings
            warnings.warn(f"seif converter plugin {ep.name!r} failed to load: {exc}",
                          stacklevel=3)


def detect_format(path: str | os.PathLike, *, must_exist: bool = True) -> str:
    """The format of an existing source (by content) or a new destination (by suffix)."""
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST_NAME).exists():
            return "seif"
        if (p / "config.json").exists():
            return "transformers"
    elif p.exists() or not must_exist:
        fmt = SUFFIX_FORMATS.get(p.suffix.lower())
        if fmt:
            return fmt
    if not p.exists() and must_exist:
        raise ConversionError("source does not exist", path=str(p))
    if not must_exist and p.suffix == "":
        return "seif"
    raise ConversionError("cannot tell the format; pass --from/--to", path=str(p))


def available() -> list[tuple[str, str]]:
    _load_plugins()
    return sorted(_REGISTRY)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, source_format: str | None = None,
            target_format: str | None = None, **options) -> Path:
    """Convert `src` to `dst`, dispatching on the formats (detected unless given)."""
    source_format = source_format or detect_format(src)
    target_format = target_format or detect_format(dst, must_exist=False)
    _load_plugins((source_format, target_format))   # all of them if none named handles it
    converter = _REGISTRY.get((source_format, target_format))
    if converter is None:
        known = ", ".join(f"{a}->{b}" for a, b in sorted(_REGISTRY))
        raise ConversionError(f"no converter from {source_format} to {target_format} "
                              f"(installed: {known})")
    return converter(src, dst, **options)
