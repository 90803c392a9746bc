"""Public conformance checks for :class:`~lightning_sketch.sketches.base.Sketch` implementations.

``check_sketch(sketch)`` runs every property a sketch must have on small N and returns a dict of
check name -> bool (it never raises on a failed property); :func:`assert_sketch` raises
``AssertionError`` listing the failures, for use in test suites (including third-party kinds).

Checks (float64, exact references):

* ``matrix``: ``apply(x) == x @ to_dense().T`` for random x (the matrix is built by applying the
  sketch to the identity);
* ``transpose_matrix``: ``transpose(y) == y @ to_dense()``;
* ``adjoint``: ⟨Φx, y⟩ == ⟨x, Φᵀy⟩;
* ``spec_roundtrip``: ``make(**json.loads(json.dumps(spec)))`` gives bit-identical outputs;
* ``deterministic``: two calls on the same input are bit-identical;
* ``shapes_dtypes``: ``[..., N] -> [..., D]`` and back for float32/float64, dtype preserved.
"""

from __future__ import annotations

import json

import torch

from lightning_sketch.sketches import Sketch, make

__all__ = ["assert_sketch", "check_sketch"]


def check_sketch(sketch: Sketch, batch: int = 3, rtol: float = 1e-10, seed: int = 0) -> dict[str, bool]:
    """Run the conformance checks on ``sketch`` (keep ``dim`` small: it materialises ``[D, N]``).

    Args:
        sketch: any sketch with a small ``dim`` (the dense matrix is built).
        batch: rows of the random test inputs.
        rtol: relative tolerance (of the operator's scale) for the float64 comparisons.
        seed: seed of the test inputs' own generator (global RNG untouched).

    Returns:
        ``{check_name: passed}`` for the checks listed in the module docstring.

    Example:
        >>> from lightning_sketch.sketches import make
        >>> all(check_sketch(make("dense", 32, 8)).values())
        True
    """
    g = torch.Generator().manual_seed(seed)
    n, d = sketch.dim, sketch.sketch_dim
    x = torch.randn(batch, n, generator=g, dtype=torch.float64)
    y = torch.randn(batch, d, generator=g, dtype=torch.float64)
    mat = sketch.to_dense(torch.float64)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and float((a - b).abs().max()) <= rtol * (float(b.abs().max()) + 1.0)

    px, pty = sketch.apply(x), sketch.transpose(y)
    results = {
        "matrix": close(px, x @ mat.T),
        "transpose_matrix": close(pty, y @ mat),
        "adjoint": abs(float((px * y).sum() - (x * pty).sum()))
        <= rtol * float(px.norm() * y.norm() + x.norm() * pty.norm()),
        "deterministic": torch.equal(sketch.apply(x), px) and torch.equal(sketch.transpose(y), pty),
    }
    rebuilt = make(**json.loads(json.dumps(sketch.spec)))
    results["spec_roundtrip"] = (
        rebuilt.spec == sketch.spec
        and torch.equal(rebuilt.apply(x), px)
        and torch.equal(rebuilt.transpose(y), pty)
    )
    ok = True
    for dtype in (torch.float32, torch.float64):
        xs = torch.randn(2, batch, n, generator=g, dtype=dtype)
        out = sketch.apply(xs)
        back = sketch.transpose(out)
        ok = (
            ok
            and out.shape == (2, batch, d)
            and out.dtype == dtype
            and back.shape == xs.shape
            and back.dtype == dtype
        )
    results["shapes_dtypes"] = bool(ok)
    return results


def assert_sketch(sketch: Sketch, **kwargs: object) -> None:
    """:func:`check_sketch`, raising ``AssertionError`` naming every failed check."""
    results = check_sketch(sketch, **kwargs)  # type: ignore[arg-type]
    failed = [name for name, passed in results.items() if not passed]
    assert not failed, f"{sketch!r} failed conformance checks: {failed}"
