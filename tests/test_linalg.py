"""The LinearOperator algebra (lightning_sketch.linalg) against dense float64 matrices.

Φ H Φᵀ (arXiv 2402.03994, eq. 10) built by composing operators is compared with Φ_dense H_dense
Φ_denseᵀ, where H_dense comes independently from ``torch.func.hessian`` of the flattened loss
(``exact_refs.dense_hessian``).
"""

from __future__ import annotations

import pytest
import torch
from exact_refs import dense_hessian
from torch import nn

from lightning_sketch.exceptions import SketchConfigError, SketchInputError
from lightning_sketch.gradients import HVPOperator, ParamLayout, make_hvp, sketched_hvp
from lightning_sketch.gradients import _functional as F
from lightning_sketch.linalg import DenseOperator, FunctionOperator, LinearOperator
from lightning_sketch.sketches import make
from lightning_sketch.spectrum import hessian_operator

D64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(m: int, n: int, seed: int = 0) -> DenseOperator:
    return DenseOperator(torch.randn(m, n, dtype=D64, generator=_gen(seed)))


def test_shapes_matvec_matmat_rows():
    a = _dense(3, 5)
    x = torch.randn(5, dtype=D64, generator=_gen(1))
    xs = torch.randn(5, 4, dtype=D64, generator=_gen(2))
    assert a.shape == (3, 5) and a.T.shape == (5, 3) and a.dtype == D64
    torch.testing.assert_close(a.matvec(x), a.matrix @ x)
    torch.testing.assert_close(a @ x, a.matrix @ x)
    torch.testing.assert_close(a.matmat(xs), a.matrix @ xs)
    torch.testing.assert_close(a @ xs, a.matrix @ xs)
    torch.testing.assert_close(a(xs.T), (a.matrix @ xs).T)  # rows convention
    torch.testing.assert_close(a(xs.T.reshape(2, 2, 5)), (a.matrix @ xs).T.reshape(2, 2, 3))
    torch.testing.assert_close(a.to_dense(), a.matrix)


def test_composition_adjoint_and_scaling_match_dense():
    a, b, c = _dense(3, 4, 0), _dense(4, 6, 1), _dense(6, 2, 2)
    abc = a @ b @ c
    dense = a.matrix @ b.matrix @ c.matrix
    assert abc.shape == (3, 2)
    torch.testing.assert_close(abc.to_dense(), dense)
    torch.testing.assert_close(abc.T.to_dense(), dense.T)
    torch.testing.assert_close((a @ (b @ c)).to_dense(), dense)
    torch.testing.assert_close((2.5 * abc).to_dense(), 2.5 * dense)
    torch.testing.assert_close((abc * -1.5).T.to_dense(), -1.5 * dense.T)
    assert abc.T.T is abc


@pytest.mark.parametrize("kind", ["dense", "fjl", "affd", "afjl", "qk", "per_layer"])
def test_adjoint_identity_for_sketch_operators(kind):
    """⟨Φv, w⟩ = ⟨v, Φᵀw⟩ for the sketch adapter, and its composition with a dense operator."""
    s = make(kind, dim=24, sketch_dim=8, seed=3)
    phi = s.op
    assert phi is s.op and phi.shape == (8, 24)
    v = torch.randn(24, dtype=D64, generator=_gen(4))
    w = torch.randn(8, dtype=D64, generator=_gen(5))
    torch.testing.assert_close(torch.dot(phi @ v, w), torch.dot(v, phi.T @ w))
    torch.testing.assert_close(phi.to_dense(), s.to_dense())
    m = _dense(24, 24, 6)
    comp = phi @ m @ phi.T
    u = torch.randn(8, dtype=D64, generator=_gen(7))
    torch.testing.assert_close(torch.dot(comp @ u, w), torch.dot(u, comp.T @ w))
    torch.testing.assert_close(comp.to_dense(), s.to_dense() @ m.matrix @ s.to_dense().T)


def test_congruence_with_symmetric_middle_is_symmetric():
    s = make("dense", dim=5, sketch_dim=3, seed=0)
    sym = FunctionOperator((5, 5), lambda v: 2 * v, symmetric=True)
    assert (s.op @ sym @ s.op.T).symmetric and ((s.op @ sym) @ s.op.T).symmetric
    assert not (s.op @ _dense(5, 5) @ s.op.T).symmetric
    op = s.op @ sym @ s.op.T
    assert op.T is op


def test_errors():
    with pytest.raises(SketchConfigError, match="cannot compose"):
        _ = _dense(3, 4) @ _dense(5, 2)
    with pytest.raises(SketchInputError, match="last dimension 4"):
        _dense(3, 4) @ torch.ones(5, dtype=D64)
    with pytest.raises(SketchConfigError, match="without an adjoint"):
        _ = FunctionOperator((2, 3), lambda v: v[:, :2]).T
    with pytest.raises(SketchConfigError, match="square"):
        LinearOperator((2, 3), symmetric=True)
    with pytest.raises(SketchInputError):
        _dense(3, 4).matvec(torch.ones(2, 4, dtype=D64))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x))).squeeze(-1)


def _loss_fn(m, batch):
    x, y = batch
    return (m(x) - y) ** 2


def _case():
    torch.manual_seed(0)
    model = _Tiny().double()
    x = torch.randn(10, 3, dtype=D64, generator=_gen(8))
    y = torch.randn(10, dtype=D64, generator=_gen(9))
    return model, (x, y)


def test_sketched_hessian_operator_matches_dense_reference():
    model, batch = _case()
    batches = [(batch[0][:4], batch[1][:4]), (batch[0][4:], batch[1][4:])]
    h_dense = dense_hessian(model, _loss_fn, batches)
    hess = make_hvp(model, _loss_fn, batches)
    assert isinstance(hess, HVPOperator) and hess.symmetric and hess.shape == h_dense.shape
    torch.testing.assert_close(hess.to_dense(), h_dense)
    s = make("affd", dim=hess.shape[0], sketch_dim=6, seed=1)
    p = s.to_dense()
    op = s.op @ hess @ s.op.T
    assert op.symmetric and op.shape == (6, 6)
    torch.testing.assert_close(op.to_dense(), p @ h_dense @ p.T)
    spectral = hessian_operator(model, _loss_fn, batches, s).operator
    torch.testing.assert_close(spectral.to_dense(), p @ h_dense @ p.T)
    v = torch.randn(6, dtype=D64, generator=_gen(10))
    torch.testing.assert_close(sketched_hvp(model, _loss_fn, batches[0], s, v),
                               p @ dense_hessian(model, _loss_fn, batches[:1]) @ p.T @ v)


def test_lift_is_theta0_plus_lift_operator():
    model, _ = _case()
    layout = ParamLayout.from_module(model)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    s = make("dense", dim=layout.dim, sketch_dim=5, seed=2)
    omega = torch.randn(5, dtype=D64, generator=_gen(11))
    lifted = F.lift(theta0, layout, s.op.T, omega)
    torch.testing.assert_close(layout.flatten(lifted), layout.flatten(theta0) + s.to_dense().T @ omega)


def test_missing_hooks_are_typed_errors_with_advice():
    bare = LinearOperator((2, 3))
    with pytest.raises(SketchConfigError, match="defines no action"):
        bare.matvec(torch.ones(3, dtype=D64))

    class RowsOnly(LinearOperator):
        def _rows(self, v):
            return v[:, :2]

    op = RowsOnly((2, 3))
    torch.testing.assert_close(op.matvec(torch.arange(3.0, dtype=D64)), torch.tensor([0.0, 1.0], dtype=D64))
    with pytest.raises(SketchConfigError, match="has no adjoint"):
        op.T.matvec(torch.ones(2, dtype=D64))


# ----------------------------------------------------------------- solvers on operators


def test_hessian_operator_is_a_symmetric_linear_operator_counting_hvps():
    """The probe-set Hessian composes and applies like any operator, and counts one HVP per row."""
    model, batch = _case()
    batches = [batch]
    h_dense = dense_hessian(model, _loss_fn, batches)
    s = make("dense", dim=h_dense.shape[0], sketch_dim=5, seed=4)
    exact = hessian_operator(model, _loss_fn, batches)
    sketched = hessian_operator(model, _loss_fn, batches, s)
    assert isinstance(exact, LinearOperator) and exact.symmetric and exact.T is exact
    assert exact.shape == h_dense.shape and sketched.shape == (5, 5) and sketched.dim == 5
    vs = torch.randn(3, 5, dtype=D64, generator=_gen(12))
    p = s.to_dense()
    torch.testing.assert_close(sketched(vs), vs @ (p @ h_dense @ p.T))  # rows, Φ H Φᵀ symmetric
    assert sketched.num_matvecs == 3
    # float32 rows in, float32 rows out (computed in the parameters' float64)
    out = exact(torch.ones(2, h_dense.shape[0], dtype=torch.float32))
    assert out.dtype == torch.float32 and exact.num_matvecs == 2
    torch.testing.assert_close(out, (torch.ones(2, h_dense.shape[0], dtype=D64) @ h_dense).float())
    # composes: Pᵀ (Φ H Φᵀ) P with a dense P is the dense product
    q = _dense(5, 2, 13)
    torch.testing.assert_close((q.T @ sketched @ q).to_dense(), q.matrix.T @ p @ h_dense @ p.T @ q.matrix)


def test_solvers_take_operators_and_matvecs_alike():
    """Lanczos, Arnoldi, SLQ and Hutch++ give the same answers on a DenseOperator and its matvec."""
    from lightning_sketch.linalg import arnoldi, hutchpp, lanczos, slq_density

    a = torch.randn(30, 30, dtype=D64, generator=_gen(14))
    a = a @ a.T / 30
    truth = torch.linalg.eigvalsh(a).flip(0)
    op = DenseOperator(a)
    r_op = lanczos(op, k=3, num_iter=30, generator=_gen(1))
    r_fn = lanczos(lambda v: a @ v, 30, 3, num_iter=30, generator=_gen(1))
    torch.testing.assert_close(r_op.eigenvalues, truth[:3])
    torch.testing.assert_close(r_fn.eigenvalues, r_op.eigenvalues)
    torch.testing.assert_close(arnoldi(op, k=2, num_iter=30, generator=_gen(1)).eigenvalues.real, truth[:2])
    d_op = slq_density(op, num_runs=2, num_iter=10, generator=_gen(2))
    d_fn = slq_density(lambda v: a @ v, 30, num_runs=2, num_iter=10, generator=_gen(2))
    torch.testing.assert_close(d_op.density, d_fn.density)
    assert abs(hutchpp(op, num_matvecs=90, generator=_gen(3)).trace - float(a.trace())) < 1e-8
    # an operator with a dtype of its own: float32 matrix under a float64 Krylov basis
    r32 = lanczos(DenseOperator(a.float()), k=1, num_iter=30, generator=_gen(1))
    assert r32.eigenvalues.dtype == D64 and abs(float(r32.eigenvalues[0] - truth[0])) < 1e-4


def test_solver_operator_errors_are_typed():
    from lightning_sketch.exceptions import SpectrumError
    from lightning_sketch.linalg import hutchinson, lanczos

    with pytest.raises(SpectrumError, match="square"):
        lanczos(_dense(3, 4), k=1)
    with pytest.raises(SpectrumError, match="disagrees"):
        lanczos(_dense(4, 4), dim=5, k=1)
    with pytest.raises(SpectrumError, match="needs `dim`"):
        lanczos(lambda v: v, k=1)
    with pytest.raises(SpectrumError, match="matvec callable"):
        hutchinson("not an operator", 4)
    with pytest.raises(SpectrumError, match=r"map a \[5\] tensor"):
        lanczos(lambda v: v[:3], 5, 1, num_iter=2)
