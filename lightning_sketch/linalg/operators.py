"""Linear operators: matrix-free maps with a shape, an adjoint and composition (pure torch).

Follows the interface of curvlinops (Dangel et al. 2025) and SciPy's ``LinearOperator``: an
operator A: R^N → R^M has ``shape == (M, N)``, :meth:`~LinearOperator.matmat` maps columns
``[N, k] -> [M, k]``, :meth:`~LinearOperator.matvec` maps ``[N] -> [M]``, :meth:`~LinearOperator.adjoint`
(also ``.T``) is Aᵀ, and ``@`` composes operators (``A @ B``) or applies one to a tensor (``A @ x``).
So the sketched Hessian of arXiv 2402.03994, eq. 10, is literally ``Φ @ H @ Φ.T``
(:attr:`lightning_sketch.sketches.Sketch.op` gives Φ; :class:`lightning_sketch.gradients.HVPOperator`
gives H), and the subspace lift θ0 + Φᵀω (eq. 4; Li et al. 2018) applies ``Φ.T`` to ω.

The rest of the library stores vectors as rows (docs/design.md, "Shape letters"), so every operator
also has :meth:`~LinearOperator.__call__`, which maps rows ``[..., N] -> [..., M]``; it is the
primitive subclasses implement (``_rows``), and ``matmat(X) == op(X.T).T``. Operators carry no
dtype of their own unless built with one (``dtype=None``: computed in the input's dtype).

Example:
    >>> import torch
    >>> A = DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], dtype=torch.float64))
    >>> B = DenseOperator(torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    >>> (A @ B).shape, (A @ B).T.shape
    ((3, 2), (2, 3))
    >>> (A @ B) @ torch.ones(2, dtype=torch.float64)
    tensor([6., 2., 6.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from lightning_sketch._checks import positive_int
from lightning_sketch.exceptions import SketchConfigError, SketchInputError

__all__ = ["DenseOperator", "FunctionOperator", "LinearOperator", "as_operator"]

Rows = Callable[[Tensor], Tensor]


class LinearOperator:
    """A linear map A: R^N → R^M given by its action (``shape == (M, N)``).

    Subclasses implement ``_rows(V: [K, N]) -> [K, M]`` and, unless the operator is symmetric
    (``symmetric=True`` makes :meth:`adjoint` return ``self``), ``_adjoint_rows(W: [K, M]) -> [K, N]``.

    Args:
        shape: ``(M, N)``.
        dtype: the dtype it computes in, or None to follow the input's dtype.
        symmetric: A = Aᵀ (a Hessian, Φ H Φᵀ).
    """

    def __init__(
        self, shape: tuple[int, int], dtype: torch.dtype | None = None, symmetric: bool = False
    ) -> None:
        m, n = (int(s) for s in shape)
        if m < 1 or n < 1:
            raise SketchConfigError(f"an operator's shape must be positive, got {tuple(shape)}.")
        if symmetric and m != n:
            raise SketchConfigError(f"a symmetric operator must be square, got shape {(m, n)}.")
        self.shape = (m, n)
        self.dtype = dtype
        self.symmetric = bool(symmetric)

    # ----------------------------------------------------------------- subclass hooks
    # The base class is the interface only: a subclass that does not define these hooks is a
    # configuration mistake, reported as such (the hooks are not abstract methods so that the base
    # constructor's own checks stay testable).
    def _rows(self, v: Tensor) -> Tensor:
        raise SketchConfigError(
            f"{type(self).__name__} defines no action: implement `_rows(V [K, N]) -> [K, M]` in the "
            "subclass, or build a FunctionOperator."
        )

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        if self.symmetric:
            return self._rows(w)
        raise SketchConfigError(
            f"{type(self).__name__} has no adjoint: implement `_adjoint_rows(W [K, M]) -> [K, N]`, pass "
            "`adjoint_rows` to FunctionOperator, or declare the operator symmetric."
        )

    # ----------------------------------------------------------------- application
    def _check(self, x: Any, n: int, what: str) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim == 0 or x.shape[-1] != n:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SketchInputError(
                f"{what} must be a real floating tensor with last dimension {n}, got {got}."
            )

    def __call__(self, v: Tensor) -> Tensor:
        """A applied to every row: ``[..., N] -> [..., M]``."""
        self._check(v, self.shape[1], f"the input of a {self.shape} operator")
        if v.ndim == 2:
            return self._rows(v)
        lead = v.shape[:-1]
        return self._rows(v.reshape(-1, self.shape[1])).reshape(*lead, self.shape[0])

    def matmat(self, x: Tensor) -> Tensor:
        """A X for columns: ``[N, k] -> [M, k]``."""
        if not isinstance(x, Tensor) or x.ndim != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SketchInputError(f"matmat takes a 2-D tensor [N, k], got {got}.")
        self._check(x.T, self.shape[1], "matmat's input (as columns)")
        return self._rows(x.T).T

    def matvec(self, x: Tensor) -> Tensor:
        """A x: ``[N] -> [M]``."""
        if not isinstance(x, Tensor) or x.ndim != 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SketchInputError(f"matvec takes a 1-D tensor [N], got {got}.")
        return self(x)

    # ----------------------------------------------------------------- algebra
    def adjoint(self) -> LinearOperator:
        """Aᵀ (``self`` for a symmetric operator)."""
        return self if self.symmetric else _Adjoint(self)

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - the conventional name
        """Aᵀ, as :meth:`adjoint`."""
        return self.adjoint()

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _Product(self, other)
        if isinstance(other, Tensor):
            return self.matvec(other) if other.ndim == 1 else self.matmat(other)
        return NotImplemented

    def __mul__(self, scalar: Any) -> LinearOperator:
        if isinstance(scalar, bool) or not isinstance(scalar, Real):
            return NotImplemented
        return _Scaled(self, float(scalar))

    __rmul__ = __mul__

    def to_dense(self, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
        """The ``[M, N]`` matrix, by applying A to the identity (small N only; for tests)."""
        return self(torch.eye(self.shape[1], dtype=self.dtype or dtype, device=device)).T.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"


class FunctionOperator(LinearOperator):
    """An operator from row functions: ``rows(V [K, N]) -> [K, M]`` and optionally its adjoint.

    Example:
        >>> import torch
        >>> A = FunctionOperator((2, 2), lambda v: 3 * v, symmetric=True)
        >>> A.matvec(torch.ones(2)).tolist(), A.T is A
        ([3.0, 3.0], True)
    """

    def __init__(
        self,
        shape: tuple[int, int],
        rows: Rows,
        adjoint_rows: Rows | None = None,
        *,
        dtype: torch.dtype | None = None,
        symmetric: bool = False,
    ) -> None:
        super().__init__(shape, dtype, symmetric)
        self._fn, self._adj_fn = rows, adjoint_rows

    def _rows(self, v: Tensor) -> Tensor:
        return self._fn(v)

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        return self._adj_fn(w) if self._adj_fn is not None else super()._adjoint_rows(w)

    def adjoint(self) -> LinearOperator:
        if self._adj_fn is None and not self.symmetric:
            raise SketchConfigError(f"{self!r} was built without an adjoint; pass `adjoint_rows`.")
        return super().adjoint()


class DenseOperator(LinearOperator):
    """An explicit ``[M, N]`` matrix as an operator (references and tests)."""

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise SketchInputError(f"DenseOperator takes a 2-D tensor, got {got}.")
        super().__init__((matrix.shape[0], matrix.shape[1]), matrix.dtype)
        self.matrix = matrix

    def _rows(self, v: Tensor) -> Tensor:
        return v @ self.matrix.T

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        return w @ self.matrix


class _Adjoint(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), op.dtype)
        self.op = op

    def _rows(self, v: Tensor) -> Tensor:
        return self.op._adjoint_rows(v)

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        return self.op._rows(w)

    def adjoint(self) -> LinearOperator:
        return self.op


class _Product(LinearOperator):
    """A B: B first, then A; (A B)ᵀ = Bᵀ Aᵀ."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape[1] != b.shape[0]:
            raise SketchConfigError(f"cannot compose operators of shapes {a.shape} @ {b.shape}.")
        symmetric = _is_congruence(a, b)
        super().__init__((a.shape[0], b.shape[1]), a.dtype or b.dtype, symmetric)
        self.a, self.b = a, b

    def _rows(self, v: Tensor) -> Tensor:
        return self.a._rows(self.b._rows(v))

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        return self.b._adjoint_rows(self.a._adjoint_rows(w))

    def __repr__(self) -> str:
        return f"({self.a!r} @ {self.b!r})"


def _is_congruence(a: LinearOperator, b: LinearOperator) -> bool:
    """True for P @ (S @ Pᵀ) or (P @ S) @ Pᵀ with S symmetric: the product is symmetric."""
    if isinstance(b, _Product) and b.a.symmetric and _adjoint_pair(a, b.b):
        return True
    return isinstance(a, _Product) and a.b.symmetric and _adjoint_pair(a.a, b)


def _adjoint_pair(p: LinearOperator, q: LinearOperator) -> bool:
    return (isinstance(q, _Adjoint) and q.op is p) or (isinstance(p, _Adjoint) and p.op is q)


class _Scaled(LinearOperator):
    def __init__(self, op: LinearOperator, c: float) -> None:
        super().__init__(op.shape, op.dtype, op.symmetric)
        self.op, self.c = op, c

    def _rows(self, v: Tensor) -> Tensor:
        return self.op._rows(v) * self.c

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        return self.op._adjoint_rows(w) * self.c

    def adjoint(self) -> LinearOperator:
        return self if self.symmetric else _Scaled(self.op.adjoint(), self.c)


def as_operator(
    operator: LinearOperator | Callable[[Tensor], Tensor],
    dim: int | None = None,
    *,
    symmetric: bool = True,
    error: type[Exception] = SketchConfigError,
) -> LinearOperator:
    """A square :class:`LinearOperator` from an operator or from a matvec ``[n] -> [n]`` and ``dim``.

    The Krylov and trace solvers take either; a matvec is applied one row at a time and each output
    is checked (shape ``[n]``, finite), since a user's function is the likeliest source of a bad one.

    Args:
        operator: a square LinearOperator, or a callable ``matvec(v [n]) -> [n]``.
        dim: n; required with a callable, and, if given with an operator, equal to its size.
        symmetric: what a callable is declared to be (its adjoint is itself if True, else absent).
        error: the exception type raised on a bad operator or matvec output.

    Raises:
        error: on a non-square operator, a ``dim`` that disagrees with it, a callable without
            ``dim``, or (when applied) a matvec output of the wrong shape or with non-finite values.

    Example:
        >>> A = as_operator(lambda v: 2 * v, dim=3)
        >>> A.shape, A.matvec(torch.ones(3)).tolist()
        ((3, 3), [2.0, 2.0, 2.0])
    """
    if isinstance(operator, LinearOperator):
        m, n = operator.shape
        if m != n:
            raise error(f"the operator must be square, got shape {operator.shape}.")
        if dim is not None and int(dim) != n:
            raise error(f"`dim` = {dim} disagrees with the operator's size {n}; leave `dim` out.")
        return operator
    if not callable(operator):
        raise error(
            f"expected a square LinearOperator or a matvec callable, got {type(operator).__name__}."
        )
    if dim is None:
        raise error("a matvec callable needs `dim`, the length of its vectors.")
    matvec, n = operator, positive_int("dim", dim, error=error)

    def rows(v: Tensor) -> Tensor:
        out = []
        for x in v:
            w = matvec(x)
            if not isinstance(w, Tensor) or w.shape != x.shape:
                shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise error(f"`matvec` must map a [{n}] tensor to a [{n}] tensor, got {shape}.")
            out.append(w.to(dtype=x.dtype, device=x.device))
        return torch.stack(out)

    return FunctionOperator((n, n), rows, symmetric=symmetric)
