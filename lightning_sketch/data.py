"""Example ids for attribution: :class:`IndexedDataset` and :func:`default_ids`.

Training data attribution needs a stable, global id for every training example so that a row of
the sketch store can be traced back to its example across epochs, shuffles and DDP ranks. The
simplest stable id is the example's position in the (map-style) dataset; :class:`IndexedDataset`
adds it to every item as the ``"index"`` entry of a dict, which the default collate function turns
into a ``[B]`` int64 tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_sketch.exceptions import SketchInputError

__all__ = ["IndexedDataset", "default_ids"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that item ``i`` becomes a dict with ``"index": i``.

    Item conversion:

    - a ``Mapping`` item keeps its keys and gains ``index_key`` (which must not be present already);
    - a tuple or list item ``(a, b, ...)`` becomes ``{names[0]: a, names[1]: b, ..., index_key: i}``
      with ``names = ("x", "y")`` by default (extra fields get ``"field2"``, ``"field3"``, ...);
    - any other item becomes ``{names[0]: item, index_key: i}``.

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``).
        names: field names for tuple items, in order.
        index_key: the key the id is stored under.

    Raises:
        SketchInputError: if ``dataset`` has no ``__len__``/``__getitem__``, or an item already
            has ``index_key``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 2])))
        >>> item = ds[2]
        >>> sorted(item), int(item["index"]), int(item["y"])
        (['index', 'x', 'y'], 2, 2)
    """

    def __init__(self, dataset: Any, names: Sequence[str] = ("x", "y"), index_key: str = "index") -> None:
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise SketchInputError(
                f"`dataset` must be a map-style dataset with __getitem__ and __len__, got "
                f"{type(dataset).__name__}; wrap iterable datasets yourself and add an `{index_key}` field."
            )
        self.dataset = dataset
        self.names = tuple(names)
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        index = torch.tensor(int(i), dtype=torch.long)
        if isinstance(item, Mapping):
            if self.index_key in item:
                raise SketchInputError(
                    f"Item {i} already has a {self.index_key!r} entry; pass another `index_key` to "
                    f"IndexedDataset."
                )
            return {**item, self.index_key: index}
        if isinstance(item, (tuple, list)):
            out = {(self.names[j] if j < len(self.names) else f"field{j}"): v for j, v in enumerate(item)}
            out[self.index_key] = index
            return out
        return {(self.names[0] if self.names else "x"): item, self.index_key: index}


def default_ids(batch: Any, id_key: str = "index") -> Tensor:
    """The ``[B]`` int64 example ids of a dict batch, read from ``batch[id_key]``.

    Raises:
        SketchInputError: if ``batch`` is not a mapping with an integer ``id_key`` entry.

    Example:
        >>> default_ids({"x": torch.zeros(2, 3), "index": torch.tensor([4, 7])}).tolist()
        [4, 7]
    """
    if not isinstance(batch, Mapping) or id_key not in batch:
        raise SketchInputError(
            f"Cannot read example ids: expected a dict batch with an {id_key!r} entry, got "
            f"{type(batch).__name__}"
            f"{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}; "
            f"wrap the dataset in lightning_sketch.data.IndexedDataset or pass `id_key`/`ids_fn` "
            f"(GradientSketch in checkpoint mode, its default, names examples without ids by their "
            f"position in the training dataset; inline mode needs ids)."
        )
    ids = batch[id_key]
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.ndim != 1:
        raise SketchInputError(
            f"`batch[{id_key!r}]` must be a 1-D integer tensor of example ids, got dtype {ids.dtype} "
            f"and shape {tuple(ids.shape)}."
        )
    return ids.to(torch.long)
