"""Which run and generation a store must be, given a Lightning checkpoint that refers to it.

A store's manifest records the ``run_id`` made when the store was created and its ``generation``
(one more per publish). The :class:`~lightning_sketch.callbacks.GradientSketch` state saved in a
Lightning checkpoint records the same ``run_id``, the generation it committed with that checkpoint
and :func:`~lightning_sketch.io.torchload.checkpoint_digest` of the checkpoint's weights and
optimizer states. With those, a reader given both a checkpoint and a store refuses:

- a checkpoint whose weights or optimizer states are not the ones it was saved with
  (:class:`~lightning_sketch.exceptions.CheckpointLoadError`);
- a store of another run, or one older than the generation the checkpoint committed (an older
  manifest put back), with :class:`~lightning_sketch.exceptions.RunMismatchError` naming both.

A consistent older copy of a whole run directory, read with no checkpoint or query result that
recorded a later generation, cannot be told from the original without state kept elsewhere.

Example:
    >>> check_store_state({"run_id": "a" * 32, "generation": 4}, run_id="a" * 32, generation=3,
    ...                   store="s", source="ckpt")
    >>> check_store_state({"run_id": "a" * 32, "generation": 2}, run_id="a" * 32, generation=3,
    ...                   store="s", source="ckpt")
    Traceback (most recent call last):
    ...
    lightning_sketch.exceptions.RunMismatchError: ... older than ...
"""

from __future__ import annotations

import os
from typing import Any

from lightning_sketch.exceptions import CheckpointLoadError, RunMismatchError
from lightning_sketch.io.safeio import check_run_id
from lightning_sketch.io.torchload import CHECKPOINT_DIGEST_KEY, checkpoint_digest

__all__ = ["check_checkpoint_digest", "check_checkpoint_store", "check_store_state", "sketch_states"]

#: the fields of a GradientSketch checkpoint state this module reads.
STATE_FIELDS = ("run_id", "generation")


def sketch_states(checkpoint: Any) -> list[dict[str, Any]]:
    """The callback states of a loaded Lightning checkpoint that record a store's ``run_id``.

    Each is a dict with ``run_id`` (32 hex digits), ``generation`` (int or None) and, when the
    writer recorded it, ``checkpoint_sha256``. Other callbacks' states are skipped.
    """
    states = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    if not isinstance(states, dict):
        return []
    return [s for s in states.values() if isinstance(s, dict) and isinstance(s.get("run_id"), str)
            and "generation" in s and "slices" in s]


def check_checkpoint_digest(checkpoint: dict[str, Any], *, path: str | os.PathLike, what: str) -> None:
    """Recompute :func:`~lightning_sketch.io.torchload.checkpoint_digest` and compare it with every digest
    a callback recorded in the checkpoint (no recorded digest: nothing to compare).

    Raises:
        CheckpointLoadError: a recorded digest is malformed or differs: the weights or optimizer
            states were changed after the checkpoint was saved.
    """
    recorded = {s.get(CHECKPOINT_DIGEST_KEY) for s in (checkpoint.get("callbacks") or {}).values()
                if isinstance(s, dict) and CHECKPOINT_DIGEST_KEY in s}
    if not recorded:
        return
    actual = checkpoint_digest(checkpoint)
    if recorded != {actual}:
        raise CheckpointLoadError(
            f"{what} {str(path)!r} is damaged: its weights or optimizer states are not the ones it was saved "
            f"with (sha256 {actual[:12]}…, recorded {sorted(str(r)[:12] for r in recorded)}). Restore the "
            "file, or use an earlier checkpoint of the run."
        )


def check_store_state(
    manifest: dict[str, Any], *, run_id: Any, generation: Any, store: str | os.PathLike, source: str
) -> None:
    """Refuse a store that is not the one ``source`` (a checkpoint, a query result) recorded.

    Args:
        manifest: the store's manifest (``run_id``, ``generation``).
        run_id: the run id ``source`` recorded (``None``: not recorded, not compared).
        generation: the generation ``source`` saw (``None``: not compared); the store may be newer.
        store: the store's path, for the message.
        source: what recorded them, for the message (e.g. "checkpoint 'last.ckpt'").

    Raises:
        RunMismatchError: the store belongs to another run, or is older than ``generation``.
        StoreCorruptError: ``run_id`` is not a run id.
    """
    check_run_id(run_id, path=str(source), what="run id recorded by")
    have, gen = manifest.get("run_id"), manifest.get("generation")
    if run_id is not None and have != run_id:
        raise RunMismatchError(
            f"The store {str(store)!r} belongs to run {have!r}, but {source} was written with the "
            "store of run "
            f"{run_id!r}: the store (or its manifest) was replaced by another run's. Pass the store and "
            "checkpoint of one run."
        )
    if isinstance(generation, int) and not isinstance(generation, bool) and isinstance(gen, int) \
            and gen < generation:
        raise RunMismatchError(
            f"The store {str(store)!r} is at generation {gen}, older than generation {generation} which "
            f"{source} recorded: an older copy of its manifest was put back, so rows committed later are "
            "missing. Restore the store's current manifest.json (or the whole run directory) from the copy "
            "that was written with this checkpoint."
        )


def check_checkpoint_store(
    checkpoint: Any, manifest: dict[str, Any], *, store: str | os.PathLike, ckpt: str | os.PathLike
) -> None:
    """Refuse a store that the checkpoint's GradientSketch states say is not the one written with it.

    The state of this store's run (same ``run_id``) must not record a later generation than the
    store's; when the checkpoint records stores but none of this run, the store is another run's.
    A checkpoint without such states (a plain model checkpoint) is not compared.

    Raises:
        RunMismatchError: see :func:`check_store_state`.
    """
    states = sketch_states(checkpoint)
    if not states:
        return
    source = f"the checkpoint {str(ckpt)!r}"
    mine = [s for s in states if s["run_id"] == manifest.get("run_id")]
    for s in mine or states[:1]:
        check_store_state(manifest, run_id=s["run_id"], generation=s.get("generation"), store=store,
                          source=source)
