"""Every exception a user's input or a run's circumstances raise, in one leaf module.

The binaries (`cli.runner.run`) catch `USER_ERRORS` and `Preempted` from here, so that they need
not import the modules that raise them (TensorFlow and the trainer) to parse flags, print
`--help` or report a bad flag. Import them from here.
"""


class ConfigError(ValueError):
  """A configuration value that cannot work, named by its dotted path."""


class DataError(ValueError):
  """Unusable input data, naming the file and the entry."""


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the run, with the reasons."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint whose files cannot be read (truncated, deleted, corrupt), naming it, the
  reason and the steps beside it."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class StorageError(RuntimeError):
  """A checkpoint that could not be written (no space, permission, quota, the object store),
  naming the step, the directory and the cause."""


class BackboneError(ValueError):
  """A backbone directory that is missing, incomplete or does not fit the run."""


class BatchError(ValueError):
  """A batch whose shapes or values do not fit the config, named field by field."""


class TrainingError(RuntimeError):
  """A run that cannot start or go on, with the reason."""


class RetrievalError(ValueError):
  """A query, gallery or index that cannot be used, with the reason."""


# Reported by the binaries as one `error: ...` line with exit status 1, without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError, BackboneError, BatchError,
               TrainingError, RetrievalError)


class Preempted(Exception):
  """Training stopped when told to (SIGTERM, a TPU preemption notice) after saving that step's
  checkpoint; re-running the same command resumes from it."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"stopped at step {step} ({reason}); its checkpoint is saved: re-run the "
                     "same command to resume")
    self.step = step
