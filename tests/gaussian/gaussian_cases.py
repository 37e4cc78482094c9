"""What the Gaussian test files share: test-local linear channels, random priors, closed-form
joint conditioning, and posterior moments read off a sampler's linear map.

Imported as ``from gaussian_cases import ...``: ``tests/gaussian/`` has no ``__init__.py``, so pytest
(prepend import mode) puts it on ``sys.path``.
"""

from __future__ import annotations

import math

import torch

from diffem_channels.base import Channel, Param, per_sample, sample_seeds
from diffem_cli.gaussian.operators import operator_matrix
from diffem_cli.gaussian.posterior import sample_from_noise
from diffem_cli.gaussian.prior import GaussianPrior


class Proj(Channel):
    """Test-local random projections ``y = A x + sigma eps``; the observation stores ``A``."""

    name = "tproj"
    linear = True
    data_kinds = frozenset({"vector"})
    params = (Param("m", int, 2), Param("sigma", float, 0.0))

    def corrupt(self, x, seeds):
        a = per_sample(seeds, (self.m, x.shape[1]), stream=1)
        y = torch.einsum("bmn,bn->bm", a, x) + self.sigma * per_sample(seeds, (self.m,), stream=2)
        return {"y": y, "A": a}

    def A(self, obs, x):
        return torch.einsum("bmn,bn->bm", obs["A"], x)

    def At(self, obs, y):
        return torch.einsum("bmn,bm->bn", obs["A"], y)

    def noise_std(self, obs):
        return self.sigma


class Mask(Channel):
    """Test-local masking ``y = mask * (x + sigma eps)`` for data of any shape."""

    name = "tmask"
    linear = True
    data_kinds = frozenset({"vector", "image"})
    params = (Param("rho", float, 0.5), Param("sigma", float, 0.0))

    def corrupt(self, x, seeds):
        shp = tuple(x.shape[1:])
        keep = (per_sample(seeds, shp, "rand", 1) >= self.rho).float()
        return {"y": keep * (x + self.sigma * per_sample(seeds, shp, stream=2)), "mask": keep}

    def A(self, obs, x):
        return obs["mask"] * x

    def At(self, obs, y):
        return obs["mask"] * y

    def noise_std(self, obs):
        return self.sigma


class Pick(Channel):
    """Test-local weighted subsampling ``y = w * x[idx] + sigma eps``: rows with one entry each."""

    name = "tpick"
    linear = True
    data_kinds = frozenset({"vector"})
    params = (Param("m", int, 3), Param("sigma", float, 0.0))

    def corrupt(self, x, seeds):
        idx = per_sample(seeds, (x.shape[1],), "rand", 1).argsort(1)[:, : self.m]
        w = 0.5 + per_sample(seeds, (self.m,), "rand", 2)
        y = w * x.gather(1, idx) + self.sigma * per_sample(seeds, (self.m,), stream=3)
        return {"y": y, "idx": idx, "w": w}

    def A(self, obs, x):
        return obs["w"] * x.gather(1, obs["idx"])

    def At(self, obs, y):
        out = torch.zeros(y.shape[0], 6, dtype=y.dtype)
        return out.scatter_add(1, obs["idx"], obs["w"] * y)

    def noise_std(self, obs):
        return self.sigma


class Squash(Channel):
    name = "squash"
    data_kinds = frozenset({"vector"})


class SharedProj(Channel):
    """Test-local projection ``y = A x + sigma eps`` with one fixed ``A`` (m x n) for every sample."""

    name = "tshared"
    linear = True
    data_kinds = frozenset({"vector"})
    params = (Param("m", int, 5), Param("sigma", float, 0.1))

    def matrix(self, n):
        return torch.randn(self.m, n, generator=torch.Generator().manual_seed(123))

    def corrupt(self, x, seeds):
        y = x @ self.matrix(x.shape[1]).T + self.sigma * per_sample(seeds, (self.m,), stream=2)
        return {"y": y}

    def A(self, obs, x):
        return x @ self.matrix(x.shape[1]).T

    def At(self, obs, y):
        return y @ self.matrix(12)

    def noise_std(self, obs):
        return self.sigma


F32_EPS = float(torch.finfo(torch.float32).eps)


def random_prior(d: int, rank: int | None = None, seed: int = 0) -> GaussianPrior:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    if rank is None:
        f = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        return GaussianPrior(mean=mean, cov=f @ f.T + 0.2 * torch.eye(d, dtype=torch.float64))
    diag = 0.05 + 0.1 * torch.rand(d, generator=g)
    return GaussianPrior(mean=mean.float(), diag=diag, factor=torch.randn(d, rank, generator=g) * 0.7)


def closed_form(prior: GaussianPrior, a: torch.Tensor, y: torch.Tensor, s: float):
    """Condition the joint Gaussian of (x, y) on the informative entries of y, one sample at a time."""
    cov, mu = prior.covariance(), prior.mean.double()
    means, covs = [], []
    for ai, yi in zip(a.double(), y.double(), strict=True):
        keep = ai.abs().sum(1) > 0
        ai, yi = ai[keep], yi[keep]
        cxy = cov @ ai.T
        cyy = ai @ cov @ ai.T + s**2 * torch.eye(len(yi), dtype=torch.float64)
        means.append(mu + cxy @ torch.linalg.solve(cyy, yi - ai @ mu))
        covs.append(cov - cxy @ torch.linalg.solve(cyy, cxy.T))
    return torch.stack(means), torch.stack(covs)


def batches(obs, size):
    n = obs["y"].shape[0]
    return lambda: ({k: v[i : i + size] for k, v in obs.items()} for i in range(0, n, size))


def linear_map(prior, ch, obs, shape, method):
    """Posterior samples are affine in the normals z: mean + L z. Returns (mean, L L^T) exactly,
    from the samples at z = 0 and z = e_j (one observation)."""
    nz = prior.noise_dim + obs["y"][0].numel()
    z = torch.cat([torch.zeros(1, nz), torch.eye(nz)])
    rep = {k: v.expand(nz + 1, *v.shape[1:]) for k, v in obs.items()}
    x = sample_from_noise(prior, ch, rep, shape, z, method, 64, 1e-6, 1e-5).reshape(nz + 1, -1).double()
    lin = (x[1:] - x[:1]).T
    return x[0], lin @ lin.T


def cond(prior, a, s):
    """Condition number of S = A Sigma A^T + s^2 I on the informative rows (float64)."""
    keep = a.abs().sum(1) > 0
    a = a[keep].double()
    s_mat = a @ prior.covariance() @ a.T + s**2 * torch.eye(a.shape[0], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(s_mat)
    return float(ev[-1] / ev[0])


def blur_basis(channel, shape):
    """The eigenbasis of one colour block of a blur (the per-channel operator)."""
    obs = channel.corrupt(torch.zeros(1, *shape), sample_seeds(0, [0]))
    a = operator_matrix(channel, obs, shape)[0]
    k = shape[1] * shape[2]
    return torch.linalg.eigh(a[:k, :k])[1].float(), a


def spectral_prior(basis, d, rank, seed):
    """A prior with a decaying spectrum in ``basis`` plus a rank-``rank`` factor."""
    g = torch.Generator().manual_seed(seed)
    k = basis.shape[0]
    gamma = (0.02 + torch.linspace(1.0, 0.05, k)).repeat(d // k)
    return GaussianPrior(
        mean=0.3 * torch.randn(d, generator=g),
        diag=gamma,
        factor=0.5 * torch.randn(d, rank, generator=g),
        basis=basis,
    )
