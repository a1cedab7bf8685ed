"""SEIF: the Sparse Expert Interchange Format.

One checkpoint format for Mixture-of-Experts models that keeps every routing detail and lets a
consumer read any single expert by itself. Public API:

- `seif.open(path)` -> `Checkpoint` (lazy, per-expert reads)
- `seif.save(path, tensors, layers, ...)` and `seif.CheckpointWriter` (streaming, atomic)
- `seif.validate(path, deep=False)`
- `seif.routing` / `seif.moe`: the reference routing and MoE math every backend is compared to
- `seif.manifest`: the typed model of `seif.json`; `seif.errors`: the `SeifError` hierarchy
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
                     ConversionError,
                     FeatureError,
                     FormatError,
                     IntegrityError,
                     RoutingError,
                     SecurityError,
                     SeifError,
                     VersionError,
)
from .layout import TensorSpec  # noqa: E402
from .manifest import (  # noqa: E402
                     Capacity,
                     FFNSpec,
                     LayerSpec,
                     Manifest,
                     ModelInfo,
                     Quantization,
                     RoutingSpec,
                     SharedExpertsSpec,
)
from .reader import Checkpoint, open  # noqa: E402
from .validate import ValidationReport, validate  # noqa: E402
from .writer import CheckpointWriter, save  # noqa: E402

__all__ = [
    "Capacity", "Checkpoint", "CheckpointWriter", "ConversionError", "FFNSpec", "FeatureError",
    "FormatError", "IntegrityError", "LayerSpec", "Manifest", "ModelInfo", "Quantization",
    "RoutingError", "RoutingSpec", "SecurityError", "SeifError", "SharedExpertsSpec",
    "TensorSpec", "ValidationReport", "VersionError", "open", "save", "validate",
]
