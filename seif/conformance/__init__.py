"""The SEIF vendor conformance suite (spec/conformance/README.md).

A catalogue of cases generated deterministically from the float64 reference (router, MoE layer
and format cases), a per-dtype tolerance policy with tie-aware routing comparison, a
:class:`Backend` interface discovered through the ``seif.conformance_backends`` entry points,
and a runner with rich, JSON and JUnit XML reports. Only NumPy (and ml_dtypes) are imported.
"""

from .backends import Backend, NumpyBackend, resolve_backend
from .cases import Case, load_cases
from .catalogue import DEFAULT_SEED, SUITE_VERSION, catalogue, generate
from .runner import Report, Result, run
from .tolerance import TOLERANCES, Tolerance

__all__ = ["DEFAULT_SEED", "SUITE_VERSION", "TOLERANCES", "Backend", "Case", "NumpyBackend",
           "Report", "Result", "Tolerance", "catalogue", "generate", "load_cases",
           "resolve_backend", "run"]
