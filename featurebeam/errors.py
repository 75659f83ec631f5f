"""The project's exception root.

Every error a user can act on derives from `FeaturebeamError`; the command line turns these
into a one-line message and exit code 2. Messages name the item, what was expected, what was
found and the fix.
"""


class FeaturebeamError(Exception):
    """Root of every featurebeam error."""


class ConfigError(FeaturebeamError):
    """A flag, YAML config or extractor config is invalid."""


class DatasetError(FeaturebeamError):
    """A dataset cannot be found, listed or read."""


class FeatureError(FeaturebeamError):
    """An unknown feature name, a duplicate registration or an extractor contract violation."""


class OutputError(FeaturebeamError):
    """The output location cannot be written, or a run folder is in the way."""


class AudioError(FeaturebeamError):
    """One audio item cannot be read, decoded or conditioned.

    Raised per item inside the pipeline, where it becomes a dead-letter record; `stage` says
    where it happened (list, read, decode, condition, extract, export) and `reason` is a short
    stable code for grouping and dashboards (`empty`, `undecodable`, `non_finite`, `too_long`, ...).
    """

    def __init__(self, message: str, *, stage: str, reason: str = "error"):
        super().__init__(message)
        self.stage = stage
        self.reason = reason


class SchemaError(OutputError):
    """A run's columns do not fit an existing table: a type or an output shape changed under the
    same extractor version. Nothing is written when this is raised."""
