"""Gaussian moments of a prior's training data, for MMPS's ``gaussian`` covariance heuristic.

MMPS needs ``Cov[x | x_t]`` inside its linear solve. The Tweedie form differentiates the network
(one vector-Jacobian product per conjugate-gradient iteration); the heuristic used by the
official EM-MMPS manifold run replaces it by the posterior covariance of a Gaussian
``N(mu, Sigma)`` fitted to the data, ``Sigma (Sigma + v I)^-1 v`` at the VE noise variance
``v = sigma_t^2 / alpha_t^2``: no network work, an exact solve, and one vector-Jacobian product
per step for the final correction. :func:`fit_moments` fits that Gaussian (full covariance up to
``FULL_MAX_DIM`` dimensions, else a rank-``r`` factor plus a diagonal) and
:class:`GaussianCovariance` applies its posterior covariance at any noise level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffem_cli.gaussian.linalg import from_coords, ppca, to_coords
from diffem_cli.gaussian.prior import GaussianPrior

FULL_MAX_DIM = 128
_F64 = torch.float64


def fit_moments(x: Tensor, rank: int = 64, seed: int = 0, full_max_dim: int = FULL_MAX_DIM) -> GaussianPrior:
    """``N(mean, Sigma)`` of the rows of ``x`` (any shape, flattened): the sample covariance up to
    ``full_max_dim`` dimensions, else its top-``rank`` PCA plus a per-coordinate diagonal."""
    flat = x.reshape(len(x), -1)
    if flat.shape[1] <= full_max_dim:
        f = flat.to(_F64)
        mean = f.mean(0)
        xc = f - mean
        return GaussianPrior(mean=mean, cov=xc.T @ xc / max(len(f) - 1, 1))
    gen = torch.Generator(device=flat.device).manual_seed(int(seed))
    mean, diag, factor = ppca(flat.float(), rank, None, gen, niter=4)
    return GaussianPrior(mean=mean, diag=diag, factor=factor)


class GaussianCovariance:
    """``u -> Cov[x | x + sqrt(v) z] u = Sigma (Sigma + v I)^-1 u`` for a Gaussian prior, on rows
    ``u`` ``(B, *shape)``, at any VE noise variance ``v``."""

    def __init__(self, prior: GaussianPrior):
        self.prior = prior
        if prior.full:
            vals, vecs = torch.linalg.eigh(prior.covariance())
            self._vals, self._vecs = vals.clamp_min(0), vecs

    def __call__(self, u: Tensor, var: float) -> Tensor:
        flat = u.reshape(len(u), -1)
        if self.prior.full:
            q = self._vecs.to(flat)
            lam = self._vals.to(flat)
            return (((flat @ q) * (lam * var / (lam + var))) @ q.T).view_as(u)
        return (var * flat - var * var * self._inverse(flat, var)).view_as(u)

    def _inverse(self, u: Tensor, var: float) -> Tensor:
        """``(Sigma + v I)^-1 u`` for ``Sigma = B diag(d) B^T + F F^T`` by Woodbury (``B`` the
        prior's block basis, or the identity), in float64."""
        p = self.prior
        basis = None if p.basis is None else p.basis.to(_F64)
        w = u.to(_F64)
        fac = p.factor.to(_F64).T  # (r, D): rows, so the block basis applies to them as to u
        if basis is not None:
            w, fac = to_coords(w, basis), to_coords(fac, basis)
        dinv = 1.0 / (p.diag.to(_F64) + var)
        out = w * dinv
        if fac.shape[0]:
            fd = fac * dinv
            k = torch.eye(fac.shape[0], dtype=_F64, device=u.device) + fd @ fac.T
            out = out - torch.linalg.solve(k, fd @ w.T).T @ fd
        if basis is not None:
            out = from_coords(out, basis)
        return out.to(u.dtype)


__all__ = ["FULL_MAX_DIM", "GaussianCovariance", "fit_moments"]
