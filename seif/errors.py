"""The SEIF error hierarchy.

Every problem with user input (a checkpoint, a manifest, a CLI argument that names a file) is
raised as a subclass of :class:`SeifError`, so callers catch one type and the CLI can print one
line and exit with a code that tells scripts *which kind* of problem it was.
"""

from __future__ import annotations


class SeifError(Exception):
    """Base class of every error SEIF raises on purpose.

    ``path`` names the file and ``field`` the manifest field or tensor involved, so the one-line
    CLI message points at the culprit.
    """

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.message = message
        self.path = path
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.path:
            where.append(str(self.path))
        if self.field:
            where.append(f"[{self.field}]")
        prefix = " ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class FormatError(SeifError):
    """The bytes or JSON do not follow the SEIF container format (malformed, inconsistent)."""

    exit_code = 2


class VersionError(SeifError):
    """The checkpoint's ``seif_version`` has a MAJOR this reader does not implement."""

    exit_code = 3


class FeatureError(SeifError):
    """The checkpoint names a required feature (or routing kind) this reader does not know."""

    exit_code = 4


class IntegrityError(SeifError):
    """A checksum does not match: the data changed after it was written."""

    exit_code = 5


class SecurityError(SeifError):
    """The input tries to reach outside the checkpoint or to exhaust resources."""

    exit_code = 6


class ConversionError(SeifError):
    """A conversion cannot be done faithfully (unsupported family, inconsistent request)."""

    exit_code = 7


class RoutingError(SeifError):
    """A routing descriptor or its inputs are inconsistent (e.g. top_k > num_experts)."""

    exit_code = 8
