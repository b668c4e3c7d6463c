"""Error types the engine raises for bad input; front ends show their message as is."""


class WorkbenchError(Exception):
    """A problem with the user's input (file, config, data): the message is the whole story."""


class CheckpointError(WorkbenchError):
    """The checkpoint file cannot be read: missing, truncated, corrupt, not a checkpoint, untrusted."""


class ArchitectureError(WorkbenchError):
    """The weights do not fit any known (or the requested) architecture."""


class SnapshotError(WorkbenchError):
    """Training snapshots are missing, have gaps, or do not match the model."""


class ConfigError(WorkbenchError):
    """A configuration value is unknown, out of range or inconsistent."""


class PlanError(WorkbenchError):
    """A pruning plan does not fit the model it is applied to."""


class DataError(WorkbenchError):
    """A dataset path or format is not usable."""


class OutputError(WorkbenchError):
    """An output cannot be written: no permission, disk full, a file where a folder should be."""


class Cancelled(Exception):
    """A long operation stopped because its cancellation event was set."""
