"""Targets found wherever the batch keeps them: a tuple ``(x, mask, y)``, a dict key of another name,
an autoencoder's own input. The recognised task then reads that entry for its margin, its kernel and
the query checks (written out here: TRAK's margin log p_y − log(1 − p_y), the squared error)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sketch.attribution.scores import classification_margin
from lightning_sketch.attribution.task import check_query_targets, resolve_task
from lightning_sketch.exceptions import SketchInputError

B, D, C = 6, 4, 3


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(D, C)

    def forward(self, x, mask):
        return self.net(x * mask)

    def per_example_loss(self, batch):
        x, mask, y = batch
        return F.cross_entropy(self(x, mask), y, reduction="none")


def _xy(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


def test_third_item_of_a_tuple_is_the_classification_target():
    m = Masked()
    x, y = _xy()
    mask = (torch.arange(D) < 3).float().expand(B, D).clone()
    task = resolve_task(m, (x, mask, y))
    assert task.kind == "classification" and task.details["target_key"] == 2
    want = classification_margin(m(x, mask), y)
    torch.testing.assert_close(-task.query_loss(m, (x, mask, y)), want)
    ((fn, drawn, w),) = task.fisher_terms(m, (x, mask, y), torch.Generator().manual_seed(0))
    assert drawn[0] is x and drawn[1] is mask and drawn[2].shape == y.shape and w == 1.0


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(D, C)

    def per_example_loss(self, batch):
        return F.cross_entropy(self.net(batch["features"]), batch["cls"], reduction="none")


def test_a_dict_key_of_another_name_is_found_and_checked_in_queries():
    m = Named()
    x, y = _xy(1)
    batch = {"features": x, "cls": y, "index": torch.arange(B)}
    task = resolve_task(m, batch)
    assert task.kind == "classification" and task.details["target_key"] == "cls"
    torch.testing.assert_close(-task.query_loss(m, batch), classification_margin(m.net(x), y))
    with pytest.raises(SketchInputError, match="'cls'"):
        check_query_targets(task, {**batch, "cls": y.float() + 0.5})


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(D, 2), nn.Linear(2, D)

    def per_example_loss(self, batch):
        (x,) = batch
        return F.mse_loss(self.dec(torch.tanh(self.enc(x))), x, reduction="none").mean(1)


def test_an_autoencoder_regresses_on_its_input():
    m = AutoEncoder()
    x = _xy(2)[0]
    task = resolve_task(m, (x,))
    assert task.kind == "regression" and task.kernel == "gauss-newton" and task.details["target_key"] == 0
    assert task.details["outputs"] == D
