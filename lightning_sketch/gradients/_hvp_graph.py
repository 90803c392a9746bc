"""One first-order gradient graph, kept and reused by every HVP at the same parameters.

A double-backward HVP is ``grad(⟨∇L(θ), v⟩, θ)``: a forward pass, a backward pass with
``create_graph=True`` (the graph of ∇L), then a backward pass through that graph. At fixed θ and a
fixed probe set the first two are the same for every v, so a Krylov iteration (80 HVPs per spectrum
snapshot) can build the graph of ∇L once and run only the last backward per HVP, with
``retain_graph=True`` (Pearlmutter 1994; the same trick as ``torch.autograd.functional.hvp`` applied
across calls). Measured on the demo Transformer: one HVP drops from 4.1x to 2.4x a plain
forward+backward, on the digits CNN from 2.4x to 1.3x (docs/measurements.md).

The price is memory: the graph of ∇L over every probe example stays alive between HVPs (about the
activations of one training step with ``create_graph=True`` over the whole probe set) until
:meth:`GraphHVP.clear` or until the parameters change.

Staleness: the graph is keyed on each parameter's, buffer's and batch tensor's storage and autograd
version counter (bumped by every in-place write, e.g. ``optimizer.step()`` or ``load_state_dict``) and
on every module's train/eval flag; a change rebuilds it. Plain tensor attributes and Python values
that the forward reads are outside the key. Writes through ``param.data`` bypass the
version counter, so whoever writes that way must call :meth:`GraphHVP.clear`.

Written by hand because neither ``torch.func`` (functional transforms rebuild the graph per call)
nor ``torch.autograd.functional.hvp`` (one vector per call, graph rebuilt each time) keeps the
graph across calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_sketch.gradients import _functional as F
from lightning_sketch.layout import ParamLayout

__all__ = ["GraphHVP"]


def _state_key(model: nn.Module, batches: list[F.Batch]) -> tuple[Any, ...]:
    """What the graph depends on: the storage, in-place version and shape of every parameter, buffer
    and batch tensor, and every module's mode."""
    tensors = [*model.parameters(), *model.buffers(), *(t for b in batches for t in F.batch_leaves(b))]
    return (
        tuple((t.data_ptr(), t._version, t.shape) for t in tensors),
        tuple(m.training for m in model.modules()),
    )


class GraphHVP:
    """v ↦ H v for the size-weighted mean loss over ``batches``, reusing the graph of ∇L.

    Args:
        model: the module (read only).
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses.
        batches: the probe batches (a list; every HVP sees all of them).
        layout: the parameters H is taken over.

    Shapes: ``[N] -> [N]`` in the layout's order, in the parameters' dtype.
    """

    def __init__(
        self, model: nn.Module, loss_fn: F.LossFn, batches: list[F.Batch], layout: ParamLayout
    ) -> None:
        self.model, self.loss_fn, self.batches, self.layout = model, loss_fn, batches, layout
        self._key: tuple[Any, ...] | None = None
        self._leaves: list[Tensor] = []
        self._grads: list[Tensor] = []
        self._index: list[int] = []
        self.builds = 0  # how many times the graph was (re)built

    def clear(self) -> None:
        """Drop the graph (frees its memory); the next HVP rebuilds it."""
        self._key, self._leaves, self._grads, self._index = None, [], [], []

    def _build(self) -> None:
        self.clear()
        selected, fixed = F.split_state(self.model, self.layout)
        leaves = [selected[n].detach().requires_grad_(True) for n in self.layout.names]
        chosen = dict(zip(self.layout.names, leaves))
        module = F._LossModule(self.model, self.loss_fn)
        sizes = [F.batch_size(b) for b in self.batches]
        total = sum(sizes)
        loss: Tensor | None = None
        for batch, size in zip(self.batches, sizes):
            term = F.check_losses(F.loss_call(module, chosen, fixed, batch), size).mean() * (size / total)
            loss = term if loss is None else loss + term
        assert loss is not None  # as_batch_list refused an empty list
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # A parameter the loss does not use has no gradient, and one it uses linearly a constant one:
        # their rows of H are zero and autograd refuses to differentiate them again.
        self._index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._index]
        self._leaves = leaves
        self._key = _state_key(self.model, self.batches)
        self.builds += 1

    def __call__(self, v: Tensor) -> Tensor:
        """H v for ``v`` ``[N]`` or ``[K, N]`` (rows one after another)."""
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            if self._key is None or self._key != _state_key(self.model, self.batches):
                self._build()
            rows = [self._one(r) for r in (v if v.ndim == 2 else v.unsqueeze(0))]
        return torch.stack(rows) if v.ndim == 2 else rows[0]

    def _one(self, row: Tensor) -> Tensor:
        if not self._index:
            return torch.zeros_like(row)
        parts = self.layout.unflatten(row.to(self._leaves[0].dtype))
        outs = [parts[self.layout.names[i]] for i in self._index]
        hv = torch.autograd.grad(
            self._grads, self._leaves, grad_outputs=outs, retain_graph=True, allow_unused=True
        )
        flat = {
            n: torch.zeros_like(t) if h is None else h for n, t, h in zip(self.layout.names, self._leaves, hv)
        }
        return self.layout.flatten(flat).to(row.dtype)
