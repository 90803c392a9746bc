"""Typed errors of :mod:`lightning_sketch`, raised at the API boundary.

Every class subclasses a builtin so ``except ValueError`` keeps working, and every message
names the argument, the expected and actual values, and what to change.
"""

from __future__ import annotations

__all__ = [
    "LightningSketchError",
    "SketchConfigError",
    "SketchInputError",
    "NotBatchFirstError",
    "SketchMemoryError",
    "SketchMismatchError",
    "LayoutMismatchError",
    "SliceMismatchError",
    "StoreNotFoundError",
    "StoreCorruptError",
    "StoreFormatError",
    "StoreWriteError",
    "DuplicateIdError",
    "NonFiniteGradientError",
    "UnsupportedModelError",
    "UnsupportedStrategyError",
    "SpectrumError",
    "SubspaceError",
    "SearchFailedError",
    "UnsafeFileError",
    "CheckpointLoadError",
    "StoreConflictError",
    "RunMismatchError",
]


class LightningSketchError(Exception):
    """Base class of every error this library raises on purpose."""


class SketchConfigError(LightningSketchError, ValueError):
    """A sketch was asked for with an impossible or unknown configuration (kind, dims, option)."""


class SketchInputError(LightningSketchError, ValueError):
    """A tensor given to a sketch has the wrong shape or dtype."""


class NotBatchFirstError(SketchInputError):
    """A hooked layer met a tensor whose leading dimension is not the batch (a sequence-first
    layer, or a table shared by every example); ``sketch_gradients(mode="auto")`` then uses
    ``torch.func`` over the whole model instead of the hooks."""


class SketchMemoryError(LightningSketchError, MemoryError):
    """A sketch would need more persistent memory than allowed (e.g. a dense D x N matrix)."""


class SketchMismatchError(LightningSketchError, ValueError):
    """Stored data was written with another sketch `spec` than the one in use."""


class LayoutMismatchError(LightningSketchError, ValueError):
    """A model's parameter layout (names, shapes, order) differs from the one data was written with."""


class SliceMismatchError(LayoutMismatchError):
    """The model given for stored data does not reproduce it: the recomputed sketched gradients of
    stored training examples differ from their stored rows (another model, loss or sketch)."""


class StoreNotFoundError(LightningSketchError, FileNotFoundError):
    """No sketch store (or one of its files) exists at the given path."""


class StoreCorruptError(LightningSketchError, OSError):
    """A store file is truncated, bit-flipped or inconsistent with its manifest checksum."""


class StoreFormatError(LightningSketchError, ValueError):
    """A store was written by an incompatible format version."""


class StoreWriteError(LightningSketchError, OSError):
    """A commit could not be written (e.g. disk full); the last committed state is intact."""


class DuplicateIdError(LightningSketchError, ValueError):
    """An example id was appended twice to the same checkpoint slice."""


class NonFiniteGradientError(LightningSketchError, FloatingPointError):
    """NaN or inf per-example gradients (or losses) met with ``nan_policy='raise'``."""


class UnsupportedModelError(LightningSketchError, TypeError):
    """A model contains a module the requested computation cannot handle (e.g. train-mode BatchNorm
    under per-example gradients)."""


class UnsupportedStrategyError(LightningSketchError, NotImplementedError):
    """A distributed strategy the callback does not support (e.g. FSDP for per-example gradients)."""


class SpectrumError(SketchConfigError):
    """Bad arguments to a Krylov solver or spectral estimator (a :class:`SketchConfigError`, as every
    bad argument is), or an operator it cannot use (non-finite products)."""


class SubspaceError(SketchConfigError):
    """Bad arguments to, or bad use of, an intrinsic-dimension subspace or search (e.g. attaching
    twice, active size out of range); a :class:`SketchConfigError`, as every bad argument is."""


class SearchFailedError(LightningSketchError, RuntimeError):
    """The intrinsic-dimension search exhausted ``max_dim`` without reaching its target."""


class UnsafeFileError(LightningSketchError, PermissionError):
    """A run file's path leaves its run directory (absolute path, ``..``, an escaping symlink), or
    names something that is not a regular file (a device, a FIFO, a directory), or is larger than
    the cap its reader allows; the file is refused without being read."""


class CheckpointLoadError(LightningSketchError, ValueError):
    """A checkpoint or weights file cannot be loaded safely: it holds objects the restricted
    (``weights_only=True``) unpickler refuses, which could run code, or it is not a PyTorch file."""


class StoreConflictError(StoreWriteError):
    """Another writer changed a run directory since this writer loaded it (its generation moved, or
    its lock file was replaced); nothing was published, the other writer's data are intact."""


class RunMismatchError(StoreCorruptError):
    """A run file is intact but is not the one its reader must see: it was written by another run
    (its ``run_id`` differs from the file or checkpoint that refers to it) or it is older than the
    generation a checkpoint or a query result recorded (an older copy was put back)."""
