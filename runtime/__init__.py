"""The SEIF reference runtime: ONNX Runtime with the `ai.seif` custom ops.

`Session(model.onnx, device="cpu"|"cuda")` runs an exported model, registering the custom-op
library (`libseif_ort.so`, see `library_path`) when it is built; without it the `ai.seif` ops run
on their portable ONNX function bodies. Import-light: onnxruntime is imported only when a
`Session` is created.
"""

from __future__ import annotations

from .library import LIBRARY_NAME, library_path

__all__ = ["LIBRARY_NAME", "Session", "library_path"]


def __getattr__(name: str):
    if name == "Session":
        from .session import Session
        return Session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
