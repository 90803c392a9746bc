"""subset_retraining against a plain per-model torch.optim.SGD loop (float64, same seeds and orders)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_sketch.evaluation import random_subsets, subset_retraining
from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError


def tiny(seed: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def out_fn(logits, y):  # any per-query output; not the library's margin, to stay independent
    return logits.gather(1, y[:, None]).squeeze(1) - logits.mean(1)


def plain_loop(x, y, xq, yq, masks, n_seeds, seed, epochs, lr, bs, mom, wd, adam=False):
    """The documented scheme, one model at a time with torch.optim.SGD (or torch.optim.Adam)."""
    n_sub = masks.shape[0]
    k = int(masks[0].sum())
    total = torch.zeros(n_sub, len(yq), dtype=torch.float64)
    for r in range(n_seeds):
        gen = torch.Generator().manual_seed(seed + 1_000_003 * (r + 1))
        perms = [torch.argsort(torch.rand(n_sub, k, generator=gen), dim=1) for _ in range(epochs)]
        for s in range(n_sub):
            torch.manual_seed(seed + r * n_sub + s)
            model = tiny(0)
            opt = (torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd) if adam else
                   torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd))
            rows = masks[s].nonzero().squeeze(1)
            for e in range(epochs):
                order = rows[perms[e][s]]
                for b0 in range(0, k, bs):
                    b = order[b0 : b0 + bs]
                    opt.zero_grad()
                    F.cross_entropy(model(x[b]), y[b]).backward()
                    opt.step()
            with torch.no_grad():
                total[s] += out_fn(model(xq), yq) / n_seeds
    return total


def test_subset_retraining_equals_plain_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(22, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (22,), generator=g)
    xq, yq = x[:5] + 0.1, y[:5]
    kw = {"n_subsets": 2, "n_seeds": 2, "fraction": 0.5, "epochs": 3, "lr": 0.2, "batch_size": 4, "momentum": 0.9,
              "weight_decay": 1e-2, "seed": 7}
    got = subset_retraining(tiny, (x, y), (xq, yq), output_fn=out_fn, **kw)
    assert got.masks.dtype == torch.bool and got.masks.shape == (2, 22)
    assert got.masks.sum(1).tolist() == [11, 11]
    assert torch.equal(got.masks, random_subsets(22, 2, 0.5, seed=7))
    ref = plain_loop(x, y, xq, yq, got.masks, 2, 7, 3, 0.2, 4, 0.9, 1e-2)
    assert got.outputs.dtype == torch.float64
    torch.testing.assert_close(got.outputs, ref, rtol=1e-10, atol=1e-10)
    # the two seeds' models differ (a mix-up of seeds would make them equal)
    one = subset_retraining(tiny, (x, y), (xq, yq), output_fn=out_fn, **{**kw, "n_seeds": 1})
    assert not torch.allclose(one.outputs, got.outputs)
    # a dataset of (x, y) items gives the same as the tensors; the caller's RNG is untouched
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    ds = subset_retraining(tiny, TensorDataset(x, y), TensorDataset(xq, yq), output_fn=out_fn, **kw)
    assert torch.equal(torch.rand(1), before)
    torch.testing.assert_close(ds.outputs, got.outputs, rtol=0, atol=0)


def test_subset_retraining_with_adam_equals_torch_optim_adam():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    kw = {"n_subsets": 2, "n_seeds": 1, "fraction": 0.5, "epochs": 3, "lr": 0.01, "batch_size": 4,
          "weight_decay": 1e-2, "seed": 3}
    got = subset_retraining(tiny, (x, y), (x[:6], y[:6]), output_fn=out_fn, optimizer="adam", **kw)
    ref = plain_loop(x, y, x[:6], y[:6], got.masks, 1, 3, 3, 0.01, 4, 0.0, 1e-2, adam=True)
    torch.testing.assert_close(got.outputs, ref, rtol=1e-10, atol=1e-10)
    sgd = subset_retraining(tiny, (x, y), (x[:6], y[:6]), output_fn=out_fn, **kw)
    assert not torch.allclose(sgd.outputs, got.outputs)
    with pytest.raises(SketchConfigError, match="`optimizer` must be"):
        subset_retraining(tiny, (x, y), (x[:6], y[:6]), optimizer="rmsprop", **kw)


def test_subset_retraining_given_masks_and_chunks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    masks = random_subsets(12, 3, 0.5, seed=5)
    full = subset_retraining(tiny, (x, y), (x, y), output_fn=out_fn, n_seeds=1, epochs=2, batch_size=3,
                             masks=masks)
    assert torch.equal(full.masks, masks) and full.outputs.shape == (3, 12)
    ref = plain_loop(x, y, x, y, masks, 1, 0, 2, 0.1, 3, 0.9, 1e-4)
    torch.testing.assert_close(full.outputs, ref, rtol=1e-10, atol=1e-10)
    chunked = subset_retraining(tiny, (x, y), (x, y), output_fn=out_fn, n_seeds=1, epochs=2, batch_size=3,
                                masks=masks, chunk_size=1)
    torch.testing.assert_close(chunked.outputs, full.outputs, rtol=1e-10, atol=1e-10)


def test_subset_retraining_typed_errors():
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    with pytest.raises(UnsupportedModelError, match="buffers"):
        subset_retraining(lambda s: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), (x, y), (x, y),
                          n_subsets=2, n_seeds=1, epochs=1)
    with pytest.raises(UnsupportedModelError, match="Dropout"):
        subset_retraining(lambda s: nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)), (x, y), (x, y),
                          n_subsets=2, n_seeds=1, epochs=1)
    with pytest.raises(SketchConfigError, match="fraction"):
        subset_retraining(lambda s: nn.Linear(3, 3), (x, y), (x, y), fraction=0.01)
    with pytest.raises(SketchInputError, match="same, non-zero length"):
        subset_retraining(lambda s: nn.Linear(3, 3), (x, y[:5]), (x, y))
    uneven = torch.zeros(2, 10, dtype=torch.bool)
    uneven[0, :3] = True
    uneven[1, :4] = True
    with pytest.raises(SketchInputError, match="same non-zero number"):
        subset_retraining(lambda s: nn.Linear(3, 3), (x, y), (x, y), masks=uneven)
