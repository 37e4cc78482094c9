"""The shared linear algebra against dense float64 solves: batched preconditioned CG (stopping
rules included), Woodbury's rule for a diagonal operator, the packed factor products and the
block-basis coordinate maps, and the device-independent eigen forms (fixed signs, principal root)."""

from __future__ import annotations

import pytest
import torch

from diffem_cli.gaussian.linalg import (
    conjugate_gradient,
    fixed_signs,
    from_coords,
    packed_pairs,
    psd_sqrt,
    to_coords,
    woodbury_sample,
)

F64 = torch.float64


def spd_batch(b: int, n: int, seed: int, lo: float = 1.0, hi: float = 10.0) -> torch.Tensor:
    """``b`` SPD ``n x n`` float64 matrices with eigenvalues spread over ``[lo, hi]``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=F64)).Q
    lam = torch.linspace(lo, hi, n, dtype=F64)
    return (q * lam) @ q.transpose(1, 2)


def matvec(m: torch.Tensor):
    return lambda v: (m @ v.reshape(v.shape[0], -1, 1)).reshape(v.shape)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_conjugate_gradient_matches_a_dense_solve(preconditioned):
    """n CG steps solve an n x n SPD system exactly in exact arithmetic; in float64 with condition
    number 10 the error is a few eps times the condition number: 1e-10 leaves a wide margin. The
    systems act on (2, 3) samples, flattened, to cover a trailing shape."""
    b, n = 5, 6
    m = spd_batch(b, n, seed=0)
    rhs = torch.randn(b, 2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    want = torch.linalg.solve(m, rhs.reshape(b, n)).reshape(b, 2, 3)
    jacobi = None
    if preconditioned:
        inv_diag = (1.0 / m.diagonal(dim1=1, dim2=2)).reshape(b, 2, 3)

        def jacobi(v: torch.Tensor) -> torch.Tensor:
            return inv_diag * v

    got = conjugate_gradient(matvec(m), rhs, n, precond=jacobi)
    assert got.shape == rhs.shape
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_conjugate_gradient_stops_at_the_tolerance():
    """With ``tol`` it stops once every system's residual norm fell by that factor (no
    preconditioner: the plain residual), in fewer steps than allowed."""
    b, n, tol = 4, 40, 1e-3
    m = spd_batch(b, n, seed=2, lo=1.0, hi=2.0)
    rhs = torch.randn(b, n, generator=torch.Generator().manual_seed(3), dtype=F64)
    calls = []

    def op(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matvec(m)(v)

    u = conjugate_gradient(op, rhs, n, tol=tol)
    assert len(calls) < n
    residual = (rhs - matvec(m)(u)).norm(dim=1)
    assert (residual <= tol * rhs.norm(dim=1)).all()


def test_conjugate_gradient_stops_a_system_without_enough_curvature():
    """A sample whose operator curves less than ``min_curvature`` along its first direction (here
    negative: ``-I``) takes no step; the others are solved as usual."""
    n = 4
    m = spd_batch(2, n, seed=4)
    m[1] = -torch.eye(n, dtype=F64)
    rhs = torch.randn(2, n, generator=torch.Generator().manual_seed(5), dtype=F64)
    u = conjugate_gradient(matvec(m), rhs, n, min_curvature=0.5)
    torch.testing.assert_close(u[0], torch.linalg.solve(m[0], rhs[0]), atol=1e-10, rtol=1e-10)
    assert torch.equal(u[1], torch.zeros(n, dtype=F64))


def test_woodbury_sample_with_zero_normals_is_the_posterior_mean():
    """Diagonal ``A`` (zeros: unobserved), prior ``diag(d) + F F^T``: with all normals zero Matheron's
    rule gives ``mu + Sigma A^T (A Sigma A^T + s^2 I)^-1 (y - A mu)``, float64 both ways."""
    g = torch.Generator().manual_seed(6)
    d, r, s = 7, 2, 0.3
    mean = torch.randn(d, generator=g, dtype=F64)
    dvec = torch.rand(d, generator=g, dtype=F64) + 0.1
    fac = torch.randn(d, r, generator=g, dtype=F64)
    a = torch.tensor([[1.0, 0.0, 2.0, 0.5, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0, 3.0, 0.0, 1.0]], dtype=F64)
    y = torch.randn(2, d, generator=g, dtype=F64) * (a != 0)
    got = woodbury_sample(mean, dvec, fac, None, a, y, torch.zeros(2, 2 * d + r, dtype=F64), s, r)
    sigma = torch.diag(dvec) + fac @ fac.T
    for i in range(2):
        keep = a[i] != 0
        ai = torch.diag(a[i])[keep]
        gain = sigma @ ai.T @ torch.linalg.inv(ai @ sigma @ ai.T + s * s * torch.eye(len(ai), dtype=F64))
        torch.testing.assert_close(got[i], mean + gain @ (y[i][keep] - ai @ mean), atol=1e-12, rtol=1e-10)


def test_packed_pairs_give_the_factor_gram_for_a_batch_of_weights():
    g = torch.Generator().manual_seed(7)
    fac = torch.randn(9, 3, generator=g, dtype=F64)
    w = torch.rand(4, 9, generator=g, dtype=F64)
    prods, where = packed_pairs(fac)
    got = (w @ prods)[:, where].view(4, 3, 3)
    want = torch.einsum("di,bd,dj->bij", fac, w, fac)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_block_coordinates_round_trip():
    g = torch.Generator().manual_seed(8)
    basis = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64)).Q
    v = torch.randn(3, 12, generator=g, dtype=F64)
    w = to_coords(v, basis)
    torch.testing.assert_close(w, v @ torch.block_diag(basis, basis, basis), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(from_coords(w, basis), v, atol=1e-12, rtol=1e-12)


def test_fixed_signs_is_the_same_for_either_sign_of_each_column():
    g = torch.Generator().manual_seed(70)
    vecs = torch.randn(6, 4, generator=g, dtype=F64)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    fixed = fixed_signs(vecs)
    assert torch.equal(fixed_signs(vecs * flips), fixed)
    assert torch.equal(fixed.abs(), vecs.abs())
    top = fixed.gather(0, fixed.abs().argmax(0, keepdim=True))
    assert bool((top > 0).all())


def test_principal_root_of_a_repeated_eigenvalue_is_the_closed_form():
    """diag(4, 4, 9) in a rotated basis: the principal root is Q diag(2, 2, 3) Q^T whatever basis
    of the repeated eigenvalue's plane the solver returns (``V sqrt(Lambda)`` would be that basis)."""
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(71), dtype=F64)).Q
    cov = (q * torch.tensor([4.0, 4.0, 9.0], dtype=F64)) @ q.T
    root = psd_sqrt(cov)
    expected = (q * torch.tensor([2.0, 2.0, 3.0], dtype=F64)) @ q.T
    # float64 eigh of a 3x3 matrix of norm 9: backward error a few units of 2^-52 times 9
    torch.testing.assert_close(root, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(root @ root.T, cov, atol=1e-12, rtol=0)


def test_principal_root_clips_negative_eigenvalues():
    cov = torch.tensor([[1.0, 0.0], [0.0, -1e-9]], dtype=F64)
    torch.testing.assert_close(psd_sqrt(cov), torch.diag(torch.tensor([1.0, 0.0], dtype=F64)))
