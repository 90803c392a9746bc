"""lds / mislabel_auroc / mislabel_detection_curve against hand-computed values, scipy and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from lightning_sketch.evaluation import lds, mislabel_auroc, mislabel_detection_curve
from lightning_sketch.exceptions import SketchInputError


def test_lds_hand_computed():
    # T = 4 examples, Q = 2 queries, S = 4 subsets.
    scores = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 1.0, 3.0]])
    masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    # predictions: q0: 3, 2, -1, 0 -> ranks 4, 3, 1, 2;  q1: 0, 1, 4, 3 -> ranks 1, 2, 4, 3
    outputs = torch.tensor([[10.0, 5.0], [7.0, 6.0], [1.0, 8.0], [2.0, 4.0]])
    # outputs q0: 10, 7, 1, 2 -> ranks 4, 3, 1, 2 (rho = 1); q1: 5, 6, 8, 4 -> ranks 2, 3, 4, 1
    # q1: d = ranks_pred - ranks_out = -1, -1, 0, 2 -> sum d^2 = 6 -> rho = 1 - 6*6/(4*15) = 0.4
    per_q = lds(scores, masks, outputs, reduction="none")
    assert per_q.dtype == torch.float64 and per_q.shape == (2,)
    assert per_q.tolist() == pytest.approx([1.0, 0.4], abs=1e-5)
    assert float(lds(scores, masks, outputs)) == pytest.approx(0.7, abs=1e-5)
    # a 0/1 float mask gives the same answer
    assert lds(scores, masks.double(), outputs, reduction="none").tolist() == pytest.approx(per_q.tolist())


def test_lds_ties_average_ranks_hand_computed():
    # predictions 1, 1, 2 (tie) against outputs 1, 2, 3: ranks 1.5, 1.5, 3 vs 1, 2, 3 -> rho = sqrt(3)/2
    scores = torch.tensor([[1.0, 0.0, 1.0]])
    masks = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    outputs = torch.tensor([[1.0], [2.0], [3.0]])
    assert float(lds(scores, masks, outputs)) == pytest.approx(np.sqrt(3) / 2, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lds_matches_scipy_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    q, t, s = 7, 30, 25
    scores = torch.randn(q, t, generator=g, dtype=torch.float64)
    masks = torch.rand(s, t, generator=g) < 0.5
    outputs = torch.randn(s, q, generator=g, dtype=torch.float64)
    outputs[:5, 0] = outputs[5, 0]  # ties in one query's outputs
    scores[1] = scores[1].round()  # integer scores: many tied predictions in query 1
    pred = (masks.double() @ scores.T).numpy()
    ref = np.array([spearmanr(pred[:, j], outputs[:, j].numpy())[0] for j in range(q)])
    got = lds(scores, masks, outputs, reduction="none").numpy()
    np.testing.assert_allclose(got, ref, atol=2e-6)
    assert float(lds(scores, masks, outputs)) == pytest.approx(ref.mean(), abs=2e-6)


def test_lds_constant_query_is_nan_and_skipped_in_mean():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, generator=g, dtype=torch.float64)
    masks = torch.rand(8, 10, generator=g) < 0.5
    outputs = torch.randn(8, 3, generator=g, dtype=torch.float64)
    outputs[:, 2] = 1.0
    per_q = lds(scores, masks, outputs, reduction="none")
    assert torch.isnan(per_q[2]) and torch.isfinite(per_q[:2]).all()
    with pytest.warns(UserWarning, match="1 of 3 queries"):
        mean = lds(scores, masks, outputs)
    assert float(mean) == pytest.approx(float(per_q[:2].mean()))


def test_lds_typed_errors():
    scores, masks, outputs = torch.zeros(2, 5), torch.zeros(4, 5, dtype=torch.bool), torch.zeros(4, 2)
    with pytest.raises(SketchInputError, match=r"`scores` must be \[Q, T\]"):
        lds(scores[0], masks, outputs)
    with pytest.raises(SketchInputError, match=r"`masks` must be \[S, T\] with T = 5"):
        lds(scores, masks[:, :4], outputs)
    with pytest.raises(SketchInputError, match=r"`outputs` must be \[S, Q\] = \[4, 2\]"):
        lds(scores, masks, outputs.T)
    with pytest.raises(SketchInputError, match="NaN/inf"):
        lds(torch.full((2, 5), float("nan")), masks, outputs)
    with pytest.raises(SketchInputError, match="NaN/inf"):
        lds(scores, masks, torch.full((4, 2), float("inf")))
    with pytest.raises(SketchInputError, match="only 0 and 1"):
        lds(scores, torch.full((4, 5), 0.5), outputs)
    with pytest.raises(SketchInputError, match="at least 3"):
        lds(scores, masks[:2], outputs[:2])
    with pytest.raises(SketchInputError, match="reduction"):
        lds(scores, masks, outputs, reduction="sum")


def test_mislabel_auroc_hand_computed():
    si = torch.tensor([5.0, 0.1, 3.0, 0.2, 0.2])
    flipped = torch.tensor([True, False, False, True, False])
    # flipped {5, 0.2} vs clean {0.1, 3, 0.2}: 5 beats all 3; 0.2 beats 0.1, loses to 3, ties 0.2 (1/2)
    assert float(mislabel_auroc(si, flipped)) == pytest.approx((3 + 1.5) / 6)


def test_mislabel_auroc_large_scores_are_not_squashed():
    # torchmetrics would pass values outside [0, 1] through a sigmoid: 1e3 and 1e4 would tie at 1.0
    si = torch.tensor([1e4, 1e3, 2e3, 1.5e3], dtype=torch.float64)
    flipped = torch.tensor([True, False, False, True])
    # 1e4 beats both clean scores, 1.5e3 beats 1e3 only: 3 of 4 pairs
    assert float(mislabel_auroc(si, flipped)) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1])
def test_mislabel_auroc_matches_sklearn_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    si = torch.randn(200, generator=g, dtype=torch.float64) * 50
    si[:40] = si[:40].round()  # some ties
    flipped = torch.rand(200, generator=g) < 0.2
    si[flipped] += 20.0
    ref = roc_auc_score(flipped.numpy(), si.numpy())
    assert float(mislabel_auroc(si, flipped)) == pytest.approx(ref, abs=1e-6)
    assert float(mislabel_auroc(si, flipped.long())) == pytest.approx(ref, abs=1e-6)


def test_mislabel_detection_curve_hand_computed():
    si = torch.tensor([0.3, 9.0, 0.1, 4.0, 0.2, 8.0, 0.0, 0.5, 0.4, 7.0])
    flipped = torch.zeros(10, dtype=torch.bool)
    flipped[[1, 3, 7]] = True  # order by score: 1 (9), 5 (8), 9 (7), 3 (4), 7 (0.5), ...
    curve = mislabel_detection_curve(si, flipped, fractions=(0.0, 0.1, 0.3, 0.4, 0.5, 1.0))
    assert curve.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3, 2 / 3, 1.0, 1.0])


def test_mislabel_typed_errors():
    with pytest.raises(SketchInputError, match="some but not all"):
        mislabel_auroc(torch.randn(5), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(SketchInputError, match="same T"):
        mislabel_auroc(torch.randn(5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(SketchInputError, match="NaN/inf"):
        mislabel_auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([True, False]))
    with pytest.raises(SketchInputError, match=r"in \[0, 1\]"):
        mislabel_detection_curve(torch.randn(4), torch.tensor([True, False, False, True]), fractions=(1.5,))
