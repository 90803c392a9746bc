"""Progress bars for the callbacks' long passes (sketching a dataset, Krylov iterations).

Shown on global rank zero only, and only when the trainer has a progress bar enabled. tqdm is the
library's one progress-bar package (also used by ``store.index`` for large index builds); Lightning
depends on it and its own progress bar uses it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer


def _enabled(trainer: Trainer) -> bool:
    return trainer.progress_bar_callback is not None and trainer.is_global_zero


def progress_iter(trainer: Trainer, iterable: Any, desc: str) -> Any:
    """``iterable`` wrapped in a transient bar (or returned as is when bars are off)."""
    if not _enabled(trainer):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def progress_bar(trainer: Trainer, total: int, desc: str, unit: str = "it") -> Any:
    """A transient bar of ``total`` steps to ``update(1)`` by hand, or ``None`` when bars are off."""
    if not _enabled(trainer):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
