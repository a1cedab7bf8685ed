"""Where the `ai.seif` custom-op library for ONNX Runtime (`libseif_ort.so`) is.

No imports beyond the standard library: finding the library must not load onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LIBRARY_NAME", "library_path"]

LIBRARY_NAME = "libseif_ort.so"
ENV_VAR = "SEIF_ORT_LIBRARY"


def library_path() -> Path | None:
    """The custom-op library to register, or None when there is none.

    Looked up in this order: `$SEIF_ORT_LIBRARY` (a file path; an explicit choice wins), then
    next to this package (`runtime/libseif_ort.so`, where an installed build puts it), then the
    CMake build folder `runtime/build/libseif_ort.so`. A `$SEIF_ORT_LIBRARY` naming a missing
    file is ignored here; `seif.runtime.Session` says so in its warning.
    """
    env = os.environ.get(ENV_VAR)
    if env and Path(env).is_file():
        return Path(env).resolve()
    here = Path(__file__).resolve().parent
    for candidate in (here / LIBRARY_NAME, here / "build" / LIBRARY_NAME):
        if candidate.is_file():
            return candidate
    return None
