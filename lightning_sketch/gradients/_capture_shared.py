"""Embeddings whose output is shared by every example of a batch (position embeddings).

A GPT-style model adds ``wpe(arange(T))`` (``[T, C]``) or, as Hugging Face GPT-2 does,
``wpe(arange(T)[None])`` (``[1, T, C]``) to the token embeddings ``[B, T, C]``: one output
broadcast over the batch, whose gradient autograd sums over the examples before any hook sees
it. :class:`GradientCapture` therefore feeds such an embedding its ids expanded to ``[B, T]``:
the output ``[B, T, C]`` holds the same values, broadcasts the same way, and its gradient keeps
one row per example, which the embedding kernel scatters exactly (the parameter's ``.grad`` is
the same sum taken in another order).

Ids ``[1, ...]`` (B > 1) and 1-D ids whose length is not B are expanded by their shape alone.
1-D ids of length B are either one id per example (a class or user embedding) or positions with
T = B; :func:`probe_shared` tells them apart on two examples before the first capture: an output
row that both example 0's and example 1's loss depend on is shared. The probe then runs the
forward once more with the expanded ids and refuses (typed error, at setup) if the losses change,
i.e. if the model uses that output other than by broadcasting it over the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sketch.exceptions import UnsupportedModelError
from lightning_sketch.gradients import _functional as F
from lightning_sketch.gradients.loss import eval_mode

__all__ = ["expanded_ids", "probe_shared"]


def expanded_ids(ids: Tensor, size: int, shared: bool | None) -> Tensor | None:
    """``ids`` expanded to carry the batch dimension ``size`` (a view), or None to leave them.

    Args:
        ids: the embedding's index tensor (any integer dtype).
        size: B, the number of examples whose losses are differentiated.
        shared: the probe's decision for 1-D ids (None: undecided; decided by the shape then).

    Returns:
        ``[B, *ids.shape[1:]]`` for ids ``[1, ...]`` (B > 1); ``[B, T]`` for 1-D ids ``[T]`` that
        are shared (B = 1: always, the one example owns every row); None otherwise.
    """
    if ids.ndim >= 2:
        return ids.expand(size, *ids.shape[1:]) if ids.shape[0] == 1 and size > 1 else None
    if ids.ndim != 1:
        return None
    if size == 1:
        return ids.unsqueeze(0) if ids.shape[0] != 1 else None
    if shared is None:
        shared = ids.shape[0] != size
    return ids.unsqueeze(0).expand(size, ids.shape[0]) if shared else None


def _rows_used(g: Tensor | None, n: int) -> Tensor:
    if g is None:
        return torch.zeros(n, dtype=torch.bool)
    return (g.detach().reshape(n, -1) != 0).any(1).cpu()


def probe_shared(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: F.Batch,
    embeddings: dict[str, nn.Embedding],
) -> dict[int, bool]:
    """Which embeddings called with 1-D ids are shared across the batch, from two examples.

    Runs ``loss_fn`` on the first two examples of ``batch`` in eval mode (RNG forked, nothing
    written): ``{id(module): shared}`` for each embedding in ``embeddings`` (name -> module) that
    was called with 1-D ids whose rows the losses depend on; modules not called so, or whose rows
    no loss depends on (all-zero gradients), are left out (decided by shape at capture time).

    Raises:
        UnsupportedModelError: naming the embeddings, if feeding a shared one its ids expanded to
            ``[B, T]`` changes the losses or breaks the forward (the output is used other than by
            broadcasting it over the batch).
    """
    size = F.batch_size(batch)
    if size < 2 or not embeddings:
        return {}
    pair = F.slice_batch(batch, 0, 2)
    names = {id(m): n for n, m in embeddings.items()}
    seen: dict[int, list[Tensor]] = {}

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        ids = args[0] if args else None
        if isinstance(ids, Tensor) and ids.ndim == 1 and isinstance(output, Tensor) and output.requires_grad:
            seen.setdefault(id(module), []).append(output)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    handles = [m.register_forward_hook(record) for m in embeddings.values()]
    try:
        with eval_mode(model), torch.random.fork_rng(devices=devices), torch.enable_grad():
            losses = F.check_losses(loss_fn(model, pair), 2)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return {}
    keys = [k for k, outs in seen.items() for _ in outs]
    outs = [o for v in seen.values() for o in v]
    g0 = torch.autograd.grad(losses[0], outs, retain_graph=True, allow_unused=True)
    g1 = torch.autograd.grad(losses[1], outs, allow_unused=True)
    decided: dict[int, bool] = {}
    for key, out, a, b in zip(keys, outs, g0, g1):
        n = out.shape[0]
        r0, r1 = _rows_used(a, n), _rows_used(b, n)
        if not bool((r0 | r1).any()):
            continue
        decided[key] = decided.get(key, False) or bool((r0 & r1).any())
    shared = [k for k, v in decided.items() if v]
    if shared:
        _check_expansion(model, loss_fn, pair, losses.detach(), {k: embeddings[names[k]] for k in shared},
                         [names[k] for k in shared], devices)
    return decided


def _check_expansion(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    pair: F.Batch,
    want: Tensor,
    modules: dict[int, nn.Module],
    names: list[str],
    devices: list[torch.device],
) -> None:
    def expand(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        ids = args[0] if args else None
        if not isinstance(ids, Tensor):
            return None
        new = expanded_ids(ids, 2, True)
        return None if new is None else (new, *args[1:])

    handles = [m.register_forward_pre_hook(expand) for m in modules.values()]
    problem = ""
    try:
        with eval_mode(model), torch.random.fork_rng(devices=devices), torch.no_grad():
            got = loss_fn(model, pair)
        if not isinstance(got, Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            problem = f"the losses became {shape}"
        elif not torch.allclose(got.to(want.dtype), want, rtol=1e-5, atol=1e-6 * float(want.abs().max())):
            problem = f"the losses changed by up to {float((got.to(want.dtype) - want).abs().max()):.3g}"
    except (RuntimeError, ValueError, IndexError) as err:
        problem = f"the forward failed ({type(err).__name__}: {str(err)[:200]})"
    finally:
        for h in handles:
            h.remove()
    if problem:
        raise UnsupportedModelError(
            f"Embedding(s) {names} are called with ids shared by every example of the batch (positions), "
            f"and their per-example gradients need those ids expanded to [B, T] (an output [B, T, C] "
            f"instead of [T, C]); with that, {problem}, so the model uses the output other than by "
            f"broadcasting it over the batch. Pass batch-first ids ([B, T] or [1, T]) to these embeddings, "
            f"or leave their parameters out with exclude=[...]."
        )
