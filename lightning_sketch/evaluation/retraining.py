"""Retraining ground truth for small models: many models trained at once with ``torch.func``.

:func:`subset_retraining` trains one model per (random subset, seed) pair with plain SGD (momentum,
coupled weight decay: exactly ``torch.optim.SGD``'s update) and measures each model's output on the
queries. All models of one seed are trained together: their parameters are stacked with
``torch.func.stack_module_state`` and one ``vmap(grad(loss))`` call gives every model's minibatch
gradient per step.

Limits (``vmap`` over a ``functional_call``):

- the model must hold no buffers (no BatchNorm running statistics: they are updated in place, which
  ``vmap`` cannot batch) and no random layers (Dropout: ``vmap`` refuses random operations by
  default); :class:`~lightning_sketch.exceptions.UnsupportedModelError` says so up front;
- the whole training set and the queries are tensors held in memory (pass a map-style dataset of
  ``(x, y)`` items and it is stacked once);
- every subset has the same size (``fraction · T``), so the models step in lockstep;
- memory grows with ``chunk_size`` models × the per-model activations of one batch: lower
  ``chunk_size`` for larger models.

Shapes: ``T`` training examples, ``Q`` queries, ``S`` subsets, ``M`` models trained together.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sketch._checks import one_of
from lightning_sketch.attribution.scores import classification_margin
from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError

__all__ = ["Retraining", "random_subsets", "subset_retraining", "train_subsets"]

LossFn = Callable[[Tensor, Tensor], Tensor]
OutputFn = Callable[[Tensor, Tensor], Tensor]


class Retraining(NamedTuple):
    """The ground truth of :func:`subset_retraining`.

    Attributes:
        masks: ``[S, T]`` bool, row ``s`` marks the training examples of subset ``s``.
        outputs: ``[S, Q]`` the output of each query, averaged over the seeds' models of subset ``s``.
    """

    masks: Tensor
    outputs: Tensor


def random_subsets(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``n_subsets`` random subsets of ``round(fraction · n_train)`` examples each: ``[S, T]`` bool.

    Subset ``s`` is ``torch.randperm(n_train, generator=g)[:k]`` for the ``s``-th draw of a
    generator seeded with ``seed``.

    Example:
        >>> m = random_subsets(10, 4, fraction=0.3, seed=0)
        >>> tuple(m.shape), m.sum(1).tolist()
        ((4, 10), [3, 3, 3, 3])
    """
    if n_train < 2 or n_subsets < 1:
        raise SketchConfigError(f"Need n_train >= 2 and n_subsets >= 1, got {n_train} and {n_subsets}.")
    k = round(fraction * n_train)
    if not 0 < k < n_train:
        raise SketchConfigError(
            f"`fraction` must leave a non-empty proper subset: round({fraction} * {n_train}) = {k} examples."
        )
    gen = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for s in range(n_subsets):
        masks[s, torch.randperm(n_train, generator=gen)[:k]] = True
    return masks


def _tensors(name: str, data: Any) -> tuple[Tensor, Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, Tensor) for v in data):
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        if not items or not all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items):
            raise SketchInputError(f"`{name}` must be (X, y) tensors or a non-empty dataset of (x, y) items.")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
    else:
        raise SketchInputError(f"`{name}` must be (X, y) tensors or a map-style dataset of (x, y) items.")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise SketchInputError(
            f"`{name}`: X and y must have the same, non-zero length, got {x.shape[0]} and {y.shape[0]}."
        )
    return x, y


def _check_model(model: nn.Module) -> None:
    if any(True for _ in model.buffers()):
        names = [n for n, _ in model.named_buffers()][:3]
        raise UnsupportedModelError(
            f"subset_retraining trains models under vmap and cannot carry buffers (found {names}; e.g. "
            f"BatchNorm running statistics). Use a buffer-free proxy model (GroupNorm/LayerNorm, or none)."
        )
    bad = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if bad:
        raise UnsupportedModelError(
            f"subset_retraining cannot train random layers under vmap (found {bad[0]}); remove dropout from "
            f"the proxy model."
        )


def _orders(n_models: int, k: int, epochs: int, order_seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(order_seed)
    return torch.stack([torch.argsort(torch.rand(n_models, k, generator=gen), dim=1) for _ in range(epochs)])


def train_subsets(
    model_fn: Callable[[int], nn.Module],
    x: Tensor,
    y: Tensor,
    rows: Tensor,
    init_seeds: Sequence[int],
    order_seed: int | None,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    orders: Tensor | None = None,
    optimizer: str = "sgd",
) -> tuple[dict[str, Tensor], nn.Module]:
    """Train ``M`` models at once, model ``m`` on training rows ``rows[m]``: stacked parameters.

    Model ``m`` starts from ``model_fn(init_seeds[m])`` (built under ``torch.manual_seed(init_seeds[m])``
    inside a forked RNG, so the caller's RNG is untouched). Each epoch it visits its rows in the order
    ``rows[m][perm[m]]`` with ``perm = torch.argsort(torch.rand(M, k, generator=g), dim=1)`` for one
    generator ``g`` seeded with ``order_seed`` (drawn once per epoch), in minibatches of ``batch_size``
    (the last one smaller), taking one SGD step per minibatch on ``loss_fn(model(x_b), y_b)``:
    ``buf = momentum · buf + (grad + weight_decay · p)``; ``p -= lr · buf`` (``buf`` starts at zero,
    i.e. ``torch.optim.SGD`` with ``dampening=0``). ``optimizer="adam"``: ``torch.optim.Adam``'s step
    instead (betas (0.9, 0.999), eps 1e-8, ``weight_decay`` added to the gradient; ``momentum`` unused).

    Args:
        model_fn: ``seed -> nn.Module`` builds a freshly initialised, buffer-free model.
        x: ``[T, ...]`` training inputs; y: ``[T, ...]`` targets.
        rows: ``[M, k]`` int64 training-row indices of each model.
        init_seeds: ``M`` initialisation seeds.
        order_seed: seed of the minibatch orders.
        epochs, lr, batch_size, momentum, weight_decay: the SGD schedule (constant lr).
        loss_fn: ``(outputs [b, ...], targets [b, ...]) -> scalar`` mean loss; default cross-entropy.
        orders: ``[epochs, M, k]`` int64 permutations ``perm`` per epoch, used instead of drawing them
            from ``order_seed`` (which may then be None).
        optimizer: ``"sgd"`` (default) or ``"adam"``.

    Returns:
        ``(params, base)``: ``params[name]`` is ``[M, ...]``, and ``base`` a meta-device copy of the
        model for ``torch.func.functional_call(base, {n: p[m] ...}, (x,))``.
    """
    from torch.func import functional_call, grad, stack_module_state, vmap

    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    one_of("optimizer", optimizer, ("sgd", "adam"))
    if rows.ndim != 2 or len(init_seeds) != rows.shape[0]:
        raise SketchInputError(
            f"`rows` must be [M, k] with M = len(init_seeds) = {len(init_seeds)}, got {tuple(rows.shape)}."
        )
    models = []
    for s in init_seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            models.append(model_fn(int(s)))
    _check_model(models[0])
    params, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return loss_fn(functional_call(base, p, (xb,)), yb)

    g_fn = vmap(grad(loss))
    buf = {k: torch.zeros_like(v) for k, v in params.items()}
    sq = {k: torch.zeros_like(v) for k, v in params.items()} if optimizer == "adam" else {}
    step = 0
    n_models, k = rows.shape
    if orders is None:
        if order_seed is None:
            raise SketchConfigError("Give `order_seed` or `orders` (the minibatch orders).")
        orders = _orders(n_models, k, epochs, int(order_seed))
    elif tuple(orders.shape) != (epochs, n_models, k):
        raise SketchInputError(
            f"`orders` must be [epochs, M, k] = [{epochs}, {n_models}, {k}], got {tuple(orders.shape)}."
        )
    with torch.no_grad():
        for e in range(epochs):
            idx = rows.gather(1, orders[e])
            for s in range(0, k, batch_size):
                b = idx[:, s : s + batch_size]
                with torch.enable_grad():
                    grads = g_fn(params, x[b], y[b])
                step += 1
                for name in params:
                    d = grads[name] + weight_decay * params[name] if weight_decay else grads[name]
                    if optimizer == "adam":  # torch.optim.Adam (amsgrad=False), written out for vmap's stacks
                        buf[name].mul_(0.9).add_(d, alpha=0.1)
                        sq[name].mul_(0.999).addcmul_(d, d, value=0.001)
                        denom = (sq[name] / (1 - 0.999**step)).sqrt_().add_(1e-8)
                        params[name].addcdiv_(buf[name], denom, value=-lr / (1 - 0.9**step))
                        continue
                    buf[name].mul_(momentum).add_(d)
                    params[name].sub_(lr * buf[name])
    return params, base


def subset_retraining(
    model_fn: Callable[[int], nn.Module],
    train: Any,
    queries: Any,
    output_fn: OutputFn | None = None,
    n_subsets: int = 100,
    n_seeds: int = 2,
    fraction: float = 0.5,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    masks: Tensor | None = None,
    optimizer: str = "sgd",
) -> Retraining:
    """Retraining ground truth for :func:`lds`: random subsets, several seeds, one output per query.

    Draws ``n_subsets`` random subsets (:func:`random_subsets` with ``seed``), trains
    ``n_subsets × n_seeds`` models from scratch with :func:`train_subsets` (model ``(r, s)`` of seed
    ``r`` and subset ``s`` starts from ``model_fn(seed + r · n_subsets + s)`` and draws its batch
    order from ``order_seed = seed + 1_000_003 · (r + 1)``), and measures ``output_fn`` on the queries
    with each model; outputs are averaged over the seeds (Park et al. 2023, Sec. 2).

    Args:
        model_fn: ``seed -> nn.Module``, a freshly initialised buffer-free model (see the module notes).
        train: ``(X [T, ...], y [T])`` tensors or a map-style dataset of ``(x, y)`` items.
        queries: ``(X_q [Q, ...], y_q [Q])`` tensors or a dataset of ``(x, y)`` items.
        output_fn: ``(model outputs [Q, ...], y_q [Q]) -> [Q]``, the measured output; default the
            classification margin (:func:`~lightning_sketch.attribution.classification_margin`).
        n_subsets, n_seeds, fraction: ``S`` subsets of ``round(fraction · T)`` examples, ``n_seeds``
            models each.
        epochs, lr, batch_size, momentum, weight_decay: SGD as ``torch.optim.SGD`` (constant lr).
        seed: seed of the subsets, the initialisations and the batch orders.
        loss_fn: ``(outputs, targets) -> scalar`` training loss; default cross-entropy.
        chunk_size: models trained together per ``vmap`` (default all ``S`` of a seed); the result
            does not depend on it.
        masks: ``[S, T]`` bool subsets to use instead of drawing them (equal row sums).
        optimizer: ``"sgd"`` (default, ``torch.optim.SGD``) or ``"adam"`` (``torch.optim.Adam`` with its
            default betas and eps; ``momentum`` unused), as the runs being attributed were trained.

    Returns:
        :class:`Retraining` ``(masks [S, T] bool, outputs [S, Q])`` in the parameters' dtype.

    Raises:
        SketchConfigError: for a bad count, fraction or schedule.
        SketchInputError: for malformed data or ``masks``.
        UnsupportedModelError: for a model with buffers (BatchNorm) or dropout.

    Example:
        >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> gt = subset_retraining(lambda s: nn.Linear(3, 2), (X, y), (X[:5], y[:5]), n_subsets=4,
        ...                        n_seeds=1, epochs=2, batch_size=8)
        >>> tuple(gt.masks.shape), tuple(gt.outputs.shape)
        ((4, 40), (4, 5))
    """
    if n_seeds < 1 or epochs < 1 or batch_size < 1 or lr <= 0:
        raise SketchConfigError(
            f"Need n_seeds >= 1, epochs >= 1, batch_size >= 1 and lr > 0, got {n_seeds}, {epochs}, "
            f"{batch_size}, {lr}."
        )
    x, y = _tensors("train", train)
    xq, yq = _tensors("queries", queries)
    t = x.shape[0]
    if masks is None:
        masks = random_subsets(t, n_subsets, fraction, seed)
    else:
        masks = torch.as_tensor(masks).bool()
        sizes = masks.sum(1)
        if (
            masks.ndim != 2
            or masks.shape[1] != t
            or not bool((sizes == sizes[0]).all())
            or int(sizes[0]) == 0
        ):
            raise SketchInputError(
                f"`masks` must be [S, T={t}] bool with the same non-zero number of examples per row, got "
                f"{tuple(masks.shape)}."
            )
    n_sub = masks.shape[0]
    rows = torch.stack([m.nonzero().squeeze(1) for m in masks])  # [S, k], ascending
    output_fn = classification_margin if output_fn is None else output_fn
    chunk = n_sub if chunk_size is None else max(1, int(chunk_size))
    from torch.func import functional_call

    total: Tensor | None = None
    for r in range(n_seeds):
        orders = _orders(n_sub, rows.shape[1], epochs, seed + 1_000_003 * (r + 1))  # independent of chunking
        outs = []
        for c0 in range(0, n_sub, chunk):
            sl = slice(c0, min(n_sub, c0 + chunk))
            params, base = train_subsets(
                model_fn, x, y, rows[sl], [seed + r * n_sub + s for s in range(sl.start, sl.stop)],
                None, epochs, lr, batch_size, momentum, weight_decay, loss_fn, orders=orders[:, sl],
                optimizer=optimizer,
            )
            with torch.no_grad():
                for m in range(sl.stop - sl.start):
                    p = {k: v[m] for k, v in params.items()}
                    outs.append(output_fn(functional_call(base, p, (xq,)), yq).reshape(-1))
        o = torch.stack(outs)
        total = o if total is None else total + o
    assert total is not None
    return Retraining(masks, total / n_seeds)
