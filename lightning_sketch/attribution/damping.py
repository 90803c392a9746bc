"""The damping λ of ``trak`` / ``fisher_if``: the automatic rule, its default and its diagnostics.

Each slice c inverts K_c + λ_c I, K_c the slice's ``[D, D]`` kernel summed over T_c examples. Without
a ground truth the library sets

    λ_c = ρ · u_c,   u_c = max(tr(K_c)/T_c, T_c/(ρ₀ τ)) / r_c,   ρ = ρ₀ = DEFAULT_DAMPING_RATIO = 10^-0.5,

where tr(K_c)/T_c is the mean squared sketched per-example gradient (of the kernel's functions: the
margin, the prediction, ...): the trace of the average per-example kernel, which follows each slice's
curvature as it grows or shrinks during training and does not depend on the sketch dimension D. On
TRAK's margin kernel r_c (:func:`residual_scale`) is the RMS residual 1 − p of the slice's examples,
read off the stored rows: the loss's curvature Σ_t p_t(1 − p_t)φ_tφ_tᵀ is smaller than K_c = Σ_t φ_tφ_tᵀ
on a well-fitted set, so the regularisation training applies is larger in K's units. On the
Gauss–Newton and Fisher kernels (which are the loss's curvature) r_c = 1.

The floor T_c/(ρ₀ τ) (T_c/τ at the default ratio) is the damping that training for a time τ applies:
gradient flow on the mean loss of a linearised model, run for a time τ, answers a removed example
with the filter (1 − e^{−Hτ})/H ≈ (H + I/τ)⁻¹ of the per-example curvature H, i.e. (K + (T/τ) I)⁻¹
in K's units; directions whose curvature training has not had time to fit are not resolved, however
small tr(K)/T is. τ is read off the run's own trajectory (:func:`training_time`: the saved weights
and mean stored gradients of its slices), and is at least Σ_s η_s of the recorded learning rates;
a run with fewer than two slices, or without saved weights, gets no floor. The floor decides on
short runs (a few epochs) and the trace term on long ones.

How ρ and the unit were chosen: on the seven-task suite of ``benchmarks/attr_suite.py`` (binary and
10-class classifiers, regression, T = 300 to 5,000, label noise, a sequence model, a causal language
model), ``benchmarks/damping_rules.py`` measures the LDS of every candidate rule over a grid of its
constant; the constant is chosen on the *validation* queries to maximise the worst task's LDS relative
to that task's best, and reported on held-out queries (``benchmarks/RESULTS.md``, "Damping rules").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DAMPING_RATIO_GRID",
    "DEFAULT_DAMPING_RATIO",
    "RESIDUAL_FLOOR",
    "effective_dimension",
    "residual_scale",
    "training_time",
]

#: ρ of the automatic damping λ_c = ρ · u_c, on every kernel (u_c: :func:`residual_scale`).
DEFAULT_DAMPING_RATIO = 10.0**-0.5
#: Candidate ratios ρ for :meth:`~lightning_sketch.attribution.Attributor.tune_damping`: 10^-4 … 10^3.
DAMPING_RATIO_GRID = tuple(float(10.0**e) for e in np.arange(-4.0, 3.01, 0.5))


def effective_dimension(s: Tensor, lam: float) -> float:
    """d_eff(λ) = Σ_i s_i / (s_i + λ): how many kernel directions the damped inverse resolves.

    Example:
        >>> effective_dimension(torch.tensor([9.0, 1.0, 0.0]), 1.0)
        1.4
    """
    s = s.to(torch.float64).clamp_min(0)
    return float((s / (s + lam)).sum()) if lam > 0 else float((s > 0).sum())


#: bounds of :func:`residual_scale`: at most a 1000-fold damping for a perfectly fitted training set
RESIDUAL_FLOOR = 1e-3


def residual_scale(grad_trace: float, kernel_trace: float) -> float:
    """r = √(tr(GᵀG)/tr(K)), clipped to [10⁻³, 1]: the RMS residual of a margin-kernel slice.

    On TRAK's margin kernel K = Σ_t φ_tφ_tᵀ (φ_t the sketched margin gradients) the stored loss
    gradients are g_t = −(1 − p_t)φ_t, so tr(GᵀG)/tr(K) is the ‖φ‖²-weighted mean of (1 − p_t)².
    The loss's true curvature is Σ_t p_t(1 − p_t)φ_tφ_tᵀ: on a well-fitted training set (small
    residuals) it is much smaller than K, so the regularisation that training applies, measured in
    K's units, is larger by about 1/r. The automatic λ on the margin kernel is therefore
    ρ · tr(K)/T / r. ``grad_trace`` = Σ_t ‖g_t‖², ``kernel_trace`` = tr(K).

    Example:
        >>> residual_scale(1.0, 100.0), residual_scale(0.0, 1.0), residual_scale(5.0, 1.0)
        (0.1, 0.001, 1.0)
    """
    if not kernel_trace > 0:
        return 1.0
    return float(min(1.0, max(RESIDUAL_FLOOR, (max(grad_trace, 0.0) / kernel_trace) ** 0.5)))


def training_time(positions: Sequence[Tensor], mean_grads: Sequence[Tensor], steps: Sequence[int],
                  lrs: Sequence[float] | None = None) -> float:
    """τ, the training time of the linearised model up to the last slice (NaN when it cannot be read).

    Gradient flow on the mean training loss L moves the weights by dθ = −∇L dτ; for plain SGD τ = Σ_s η_s
    (momentum and Adam change the scale, which is why τ is read off the trajectory rather than the
    learning rates). Between consecutive slices c − 1 and c, with sketched weights Φθ_c (``positions``,
    ``[D]`` each) and mean sketched loss gradients ḡ_c = (1/T_c) Σ_t g_t (``mean_grads``, ``[D]``),

        τ_c − τ_{c−1} = −⟨Φθ_c − Φθ_{c−1}, ḡ⟩ / ‖ḡ‖²,   ḡ = (ḡ_{c−1} + ḡ_c)/2,

    clipped at 0; the interval before the first slice is the others' mean rate times its step count
    (``steps``: the global step of each slice). Needs at least two slices, and weights that moved
    (identical weights at every slice, as in a store written by hand, tell nothing). With the slices' learning
    rates ``lrs``, τ is at least Σ_c η_c (step_c − step_{c−1}) (step_{−1} = 0): the time plain SGD covers
    in those steps, a lower bound for momentum (which only adds to it). It guards against the
    trajectory's estimate falling short where SGD noise dominates the moves between slices; under Adam
    (η far below its effective step) it is small and the trajectory's estimate stands.

    Example:
        >>> g = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])]
        >>> training_time([torch.tensor([0.0, 0.0]), torch.tensor([-2.0, 5.0])], g, [10, 20])
        4.0
    """
    if len(positions) < 2 or not (len(positions) == len(mean_grads) == len(steps)):
        return float("nan")
    if all(torch.equal(p, positions[0]) for p in positions[1:]):  # weights that never moved: no trajectory
        return float("nan")
    first_steps, later_steps = steps[0], steps[-1] - steps[0]
    if later_steps <= 0 or first_steps < 0:
        return float("nan")
    total = 0.0
    for c in range(1, len(positions)):
        g = 0.5 * (mean_grads[c] + mean_grads[c - 1]).to(torch.float64)
        gg = float(g @ g)
        if gg > 0:  # an interval with no mean gradient adds nothing it can measure
            total += max(0.0, -float((positions[c] - positions[c - 1]).to(torch.float64) @ g) / gg)
    tau = total * (1.0 + first_steps / later_steps) if math.isfinite(total) else 0.0
    if lrs is not None and len(lrs) == len(steps) and all(math.isfinite(lr) and lr >= 0 for lr in lrs):
        tau = max(tau, sum(lr * (b - a) for lr, a, b in zip(lrs, [0, *steps[:-1]], steps)))
    return tau if tau > 0 else float("nan")
