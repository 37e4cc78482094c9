"""The small linear algebra of the Gaussian start and of MMPS: one batched, preconditioned
conjugate gradient, Matheron's rule by Woodbury for a diagonal operator, the packed factor
products that rule needs, block-basis coordinate maps, the PCA M-step, and the device-independent
forms of eigen-decompositions (signs fixed; the principal square root)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_F64 = torch.float64


def to_coords(v: Tensor, basis: Tensor) -> Tensor:
    """Rows ``v`` ``(B, D)`` in the block basis ``I (x) basis`` (each block of ``k`` times ``basis``)."""
    k = basis.shape[0]
    return (v.reshape(v.shape[0], -1, k) @ basis).reshape(v.shape)


def from_coords(w: Tensor, basis: Tensor) -> Tensor:
    """The inverse of :func:`to_coords` (the basis is orthonormal)."""
    k = basis.shape[0]
    return (w.reshape(w.shape[0], -1, k) @ basis.T).reshape(w.shape)


def fixed_signs(vecs: Tensor) -> Tensor:
    """``vecs`` with each column negated where needed so that its entry of largest magnitude is
    positive: an eigensolver may return either sign, and CPU and CUDA solvers differ, so a factor
    built from its columns would draw other samples from the same seed on another device."""
    idx = vecs.abs().argmax(0, keepdim=True)
    sign = torch.where(vecs.gather(0, idx) < 0, -1.0, 1.0).to(vecs)
    return vecs * sign


def psd_sqrt(cov: Tensor) -> Tensor:
    """The principal square root ``S = V diag(sqrt(max(lambda, 0))) V^T`` of a symmetric matrix:
    ``S S^T = cov`` (negative eigenvalues clipped), and unique, unlike ``V diag(sqrt(lambda))``,
    whose columns' signs and whose basis of a repeated eigenvalue are the solver's choice."""
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products, shaped to broadcast against ``a``."""
    d = (a * b).flatten(1).sum(1)
    return d.view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(
    op: Callable[[Tensor], Tensor],
    rhs: Tensor,
    iters: int,
    *,
    precond: Callable[[Tensor], Tensor] | None = None,
    tol: float = 0.0,
    min_curvature: float = 0.0,
) -> Tensor:
    """Batched preconditioned conjugate gradients for ``op(u) = rhs`` from ``u = 0``: one system per
    sample (the first dimension; any trailing shape), ``op`` and ``precond`` (default: none)
    applied to the whole batch at once.

    Runs ``iters`` steps, fewer once every system's preconditioned residual ``r . M^-1 r`` fell by
    ``tol^2`` (``tol = 0``: all of them). A system whose curvature ``p . op(p)`` along a search
    direction is not positive, or is below ``min_curvature * p . p`` (a learnt Jacobian need not be
    positive definite), stops there for that sample instead of taking a huge step; so does one
    already solved exactly.
    """
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = _dot(r, z)
    stop = tol * tol * rz
    for _ in range(iters):
        if bool((rz <= stop).all()):
            break
        q = op(p)
        pq = _dot(p, q)
        ok = (pq > 0) & (rz > 0)
        if min_curvature > 0:
            ok &= pq > min_curvature * _dot(p, p)
        alpha = torch.where(ok, rz / torch.where(ok, pq, 1.0), 0.0)
        u = u + alpha * p
        r = r - alpha * q
        z = r if precond is None else precond(r)
        rz_new = _dot(r, z)
        beta = torch.where(ok, rz_new / torch.where(ok, rz, 1.0), 0.0)
        p = torch.where(ok, z + beta * p, 0.0)
        rz = torch.where(ok, rz_new, 0.0)
    return u


def packed_pairs(factor: Tensor) -> tuple[Tensor, Tensor]:
    """Products ``F_i * F_j`` ``(D, p)`` over the upper triangle ``i <= j`` of ``r x r``, and for each
    of the ``r * r`` entries its column there: then ``F^T diag(w) F`` for a whole batch of ``w`` is
    one matrix product and one gather."""
    r = factor.shape[1]
    iu = torch.triu_indices(r, r, device=factor.device)
    where = torch.empty(r, r, dtype=torch.long, device=factor.device)
    k = torch.arange(iu.shape[1], device=factor.device)
    where[iu[0], iu[1]] = k
    where[iu[1], iu[0]] = k
    return factor[:, iu[0]] * factor[:, iu[1]], where.flatten()


def woodbury_sample(
    mean: Tensor,
    dvec: Tensor,
    fac: Tensor,
    pairs: tuple[Tensor, Tensor] | None,
    a: Tensor,
    y: Tensor,
    z: Tensor,
    s: float,
    rz: int,
) -> Tensor:
    """Matheron's rule under ``N(mean, diag(dvec) + F F^T)`` for a diagonal ``A = diag(a)``, exact by
    Woodbury: ``S = diag(a^2 dvec + s^2) + (aF)(aF)^T``, so each sample solves one ``r x r`` system
    (one for the whole batch when ``a`` is ``(1, D)``). ``z``: normals ``(B, D + rz + D)`` for the
    prior draw (``rz >= r`` factor normals, the first ``r`` used) and the noise; ``pairs``: the
    factor's :func:`packed_pairs`, when already formed. Entries with ``a = 0`` carry no
    information (their weight is 0)."""
    d, r = mean.numel(), fac.shape[1]
    x0 = mean + z[:, :d] * dvec.sqrt()
    if r:
        x0 = x0 + z[:, d : d + r] @ fac.T
    eps = z[:, d + rz :]
    den = a * a * dvec + s * s
    p = torch.where((a != 0) & (den > 0), 1.0 / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    pr = p * (y - a * x0 - s * eps)
    if r:
        prods, where = pairs if pairs is not None else packed_pairs(fac)
        core = ((a * a * p) @ prods)[:, where].view(-1, r, r)  # F^T diag(a^2 p) F, (B or 1, r, r)
        core.diagonal(dim1=1, dim2=2).add_(1.0)
        chol, _ = torch.linalg.cholesky_ex(core)  # I + (PSD): always positive definite
        t = torch.cholesky_solve(((a * pr) @ fac)[..., None], chol)[..., 0]
        pr = pr - p * a * (t @ fac.T)
    u = a * pr
    out = x0 + dvec * u
    return out + (u @ fac) @ fac.T if r else out


def ppca(
    x: Tensor, rank: int, previous: Tensor | None, generator: torch.Generator, niter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The M-step on posterior samples ``x`` ``(n, D)`` (any orthonormal coordinates): their mean,
    and their covariance's top-``rank`` eigenpairs as the factor (randomised subspace iteration on
    the centred samples, started from the previous factor's span plus random directions, then
    Rayleigh-Ritz), with a per-coordinate diagonal taking the rest of each variance.
    Returns ``(mean, diag, factor)``."""
    n, d = x.shape
    mean = x.sum(0, dtype=_F64).div(n).float()
    xc = x - mean
    var = xc.square().mean(0)
    q = min(rank + 8, d, n)
    guess = torch.randn(d, q, generator=generator, device=generator.device).to(xc)
    if previous is not None and previous.shape[1] and bool(previous.any()):
        keep = min(previous.shape[1], q)
        guess[:, :keep] = previous[:, :keep].to(xc)
    basis = torch.linalg.qr(guess).Q
    for _ in range(niter):
        basis = torch.linalg.qr(xc.T @ (xc @ basis)).Q
    proj = xc @ basis
    vals, vecs = torch.linalg.eigh(proj.T @ proj / n)  # ascending
    r = min(rank, q)
    factor = fixed_signs(basis @ vecs[:, -r:].flip(1)) * vals[-r:].flip(0).clamp_min(0).sqrt()
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(d, rank - r)], 1)
    floor = 1e-3 * float(var.mean().clamp_min(1e-12))
    diag = (var - factor.square().sum(1)).clamp_min(floor)
    return mean, diag, factor
