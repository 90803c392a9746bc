"""A damaged checkpoint given to ``trainer.fit(ckpt_path=...)`` fails with a typed error.

Lightning loads the resume checkpoint itself (``strategy.checkpoint_io.load_checkpoint``) after
the callbacks' ``setup`` and before any callback sees it, and ``torch.load`` neither checks the
CRC-32 its zip archive carries nor turns a truncated file into anything but a raw ``OSError`` or
``RuntimeError``. So the run's callbacks wrap the strategy's ``CheckpointIO`` in ``setup``
(:func:`guard_checkpoint_io`): the wrapper checks the file with
:func:`~lightning_sketch.io.torchload.check_torch_archive` (every member's CRC, no unpickling) and
then delegates; everything else is delegated unchanged. ``teardown`` puts the original back
(:func:`unguard_checkpoint_io`).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer

from lightning_sketch.io.torchload import check_torch_archive

__all__ = ["guard_checkpoint_io", "unguard_checkpoint_io"]


class _GuardedCheckpointIO(CheckpointIO):
    """Delegates to ``inner``; ``load_checkpoint`` of a local file checks its archive first."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            check_torch_archive(path, what="resume checkpoint (`ckpt_path`)")
        kwargs: dict[str, Any] = {} if weights_only is None else {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        return self.inner.load_checkpoint(path, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def guard_checkpoint_io(trainer: Trainer) -> None:
    """Wrap ``trainer.strategy.checkpoint_io`` (once; a second call does nothing)."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if not isinstance(current, _GuardedCheckpointIO):
        strategy.checkpoint_io = _GuardedCheckpointIO(current)


def unguard_checkpoint_io(trainer: Trainer) -> None:
    """Put back the ``CheckpointIO`` that :func:`guard_checkpoint_io` wrapped."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if isinstance(current, _GuardedCheckpointIO):
        strategy.checkpoint_io = current.inner
