"""Lap 0 of DiffEM: a Gaussian prior fitted to corrupted observations by EM on moments, and
exact Gaussian posterior samples that start the EM loop.

Works for any linear channel ``y = A x + s * eps`` (the channel offers ``A``, ``A^T`` and
``s``) and data of any shape, flattened to dimension ``D``. Two regimes:

* ``D <= full_max_dim``: a full covariance. Each sample's ``A`` is read off the channel
  (its diagonal when ``A`` is diagonal, as for masks; else materialised on basis vectors), the
  posterior is solved exactly with batched Cholesky in float64 on the informative rows only,
  and EM is exact (posterior means and covariances). Cost per observation ~ k^3 for k
  informative rows (plus k D^2 when ``A`` is dense).
* larger ``D``: a low-rank-plus-diagonal covariance. Posterior samples come from
  perturb-then-correct (Matheron's rule) with a preconditioned conjugate-gradient solve that
  only calls ``A`` and ``A^T``; EM is stochastic with a PCA M-step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffem_channels.base import Channel, per_sample, sample_seeds
from diffem_cli.errors import DiffemError

Obs = Mapping[str, Tensor]
ObsBatches = Callable[[], Iterable[Obs]]
ProgressFn = Callable[[int, int, dict[str, float]], None]

START_TAG = 0x6761757373  # keeps the Gaussian start's draws apart from the channel's own streams
_BUDGET = 2**28  # bytes of working memory per internal sub-batch
_F64 = torch.float64


@dataclass(eq=False)
class GaussianPrior:
    """``N(mean, Sigma)`` on flattened data: ``Sigma = cov`` (full) or ``diag(diag) + factor factor^T``."""

    mean: Tensor
    cov: Tensor | None = None
    diag: Tensor | None = None
    factor: Tensor | None = None
    _root: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean).flatten()
        d = self.mean.numel()
        if self.cov is not None:
            if self.diag is not None or self.factor is not None:
                raise ValueError("give either cov or diag (+ factor), not both")
            if tuple(self.cov.shape) != (d, d):
                raise ValueError(f"cov must have shape ({d}, {d}), got {tuple(self.cov.shape)}")
            return
        if self.diag is None:
            raise ValueError("a Gaussian prior needs cov or diag")
        if tuple(self.diag.shape) != (d,):
            raise ValueError(f"diag must have shape ({d},), got {tuple(self.diag.shape)}")
        if self.factor is None:
            self.factor = self.mean.new_zeros(d, 0)
        if self.factor.dim() != 2 or self.factor.shape[0] != d:
            raise ValueError(f"factor must have shape ({d}, r), got {tuple(self.factor.shape)}")

    @property
    def dim(self) -> int:
        """Flattened data dimension ``D``."""
        return self.mean.numel()

    @property
    def full(self) -> bool:
        """True for a full covariance, False for low-rank plus diagonal."""
        return self.cov is not None

    @property
    def noise_dim(self) -> int:
        """Standard normals one prior draw consumes (``D``, or ``D + r`` for low rank)."""
        return self.dim if self.full else self.dim + self.factor.shape[1]

    def to(self, device: torch.device | str) -> GaussianPrior:
        """This prior with its tensors on ``device``."""
        return GaussianPrior.from_tensors({k: v.to(device) for k, v in self.to_tensors().items()})

    def covariance(self) -> Tensor:
        """The dense ``(D, D)`` covariance in float64 (for small ``D``)."""
        if self.cov is not None:
            return self.cov.to(_F64)
        f = self.factor.to(_F64)
        return torch.diag(self.diag.to(_F64)) + f @ f.T

    def root(self) -> Tensor:
        """A float64 ``L`` with ``L L^T = cov`` (full covariance only), from a clipped eigh; cached."""
        if self.cov is None:
            raise ValueError("root() needs a full covariance")
        if self._root is None:
            cov = self.covariance()
            vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
            self._root = vecs * vals.clamp_min(0).sqrt()
        return self._root

    def draw(self, z: Tensor) -> Tensor:
        """Map standard normals ``z`` ``(n, noise_dim)`` to prior draws ``(n, D)`` in ``z``'s dtype."""
        if self.cov is not None:
            return self.mean.to(z.dtype) + z @ self.root().to(z.dtype).T
        d = self.dim
        out = self.mean.to(z.dtype) + z[:, :d] * self.diag.to(z.dtype).clamp_min(0).sqrt()
        if self.factor.shape[1]:
            out = out + z[:, d:] @ self.factor.to(z.dtype).T
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``(n, D)`` as float32."""
        z = torch.randn(n, self.noise_dim, generator=generator, device=self.mean.device)
        return self.draw(z.to(_F64) if self.full else z).float()

    def to_tensors(self) -> dict[str, Tensor]:
        """Named contiguous tensors for safetensors storage."""
        named = {"mean": self.mean, "cov": self.cov, "diag": self.diag, "factor": self.factor}
        return {k: v.contiguous() for k, v in named.items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> GaussianPrior:
        """Rebuild a prior from ``to_tensors()``'s output."""
        if "mean" not in tensors or ("cov" not in tensors and "diag" not in tensors):
            raise DiffemError(f"not a Gaussian prior: tensors {sorted(tensors)} lack mean and cov/diag")
        return cls(
            mean=tensors["mean"],
            cov=tensors.get("cov"),
            diag=tensors.get("diag"),
            factor=tensors.get("factor"),
        )


# ---------------------------------------------------------------- channel plumbing


def _check_linear(channel: Channel) -> None:
    if not getattr(channel, "linear", False):
        raise DiffemError(
            f"channel {channel.name!r} has no linear form, so it has no Gaussian start; use --warm-start"
        )


def _batch(obs: Obs) -> int:
    return int(obs["y"].shape[0])


def _ydim(obs: Obs) -> int:
    return math.prod(obs["y"].shape[1:])


def _dtype(obs: Obs) -> torch.dtype:
    y = obs["y"]
    return y.dtype if y.is_floating_point() else torch.float32


def _chunks(obs: Obs, per_sample_bytes: int) -> Iterator[Obs]:
    """Split a batch of observations into sub-batches whose working memory fits the budget."""
    b = _batch(obs)
    step = max(1, _BUDGET // max(per_sample_bytes, 1))
    if step >= b:
        yield obs
        return
    for i in range(0, b, step):
        yield {
            k: v[i : i + step] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
            for k, v in obs.items()
        }


def _apply_a(channel: Channel, obs: Obs, x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``A x`` for flattened ``x`` ``(B, D)``, flattened to ``(B, m)``."""
    b = x.shape[0]
    out = channel.A(obs, x.to(_dtype(obs)).reshape(b, *shape))
    if out.numel() != b * _ydim(obs):
        raise DiffemError(f"channel {channel.name!r}: A(x) has shape {tuple(out.shape)}, unlike y")
    return out.reshape(b, -1)


def _apply_at(channel: Channel, obs: Obs, v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``A^T v`` for flattened ``v`` ``(B, m)``, flattened to ``(B, D)``."""
    b = v.shape[0]
    out = channel.At(obs, v.to(_dtype(obs)).reshape(obs["y"].shape))
    if out.numel() != b * math.prod(shape):
        raise DiffemError(f"channel {channel.name!r}: At(y) has shape {tuple(out.shape)}, not data {shape}")
    return out.reshape(b, -1)


def _repeat(obs: Obs, times: int) -> Obs:
    """Each sample's observation repeated ``times`` times in a row (batch ``B * times``)."""
    b = _batch(obs)
    return {
        k: v.repeat_interleave(times, 0) if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
        for k, v in obs.items()
    }


def operator_matrix(channel: Channel, obs: Obs, shape: tuple[int, ...]) -> Tensor:
    """Each sample's ``A`` as a float64 ``(B, m, D)`` tensor, by applying the channel to basis
    vectors: of the ``y`` space through ``A^T`` when ``m < D``, else of the data space through
    ``A``; several basis vectors per call, on the observations repeated, to keep calls few."""
    _check_linear(channel)
    b, m, d = _batch(obs), _ydim(obs), math.prod(shape)
    dev, dt = obs["y"].device, _dtype(obs)
    out = torch.empty(b, m, d, dtype=_F64, device=dev)
    n_basis = min(m, d)
    block = max(1, min(n_basis, 2**22 // max(b * max(m, d), 1)))
    eye = torch.eye(n_basis, dtype=dt, device=dev)
    for j in range(0, n_basis, block):
        basis = eye[j : j + block]
        c = basis.shape[0]
        rep = _repeat(obs, c) if c > 1 else obs
        x = basis.repeat(b, 1)
        if m < d:
            out[:, j : j + c, :] = _apply_at(channel, rep, x, shape).view(b, c, d)
        else:
            out[:, :, j : j + c] = _apply_a(channel, rep, x, shape).view(b, c, m).transpose(1, 2)
    return out


def _flat_y(obs: Obs) -> Tensor:
    return obs["y"].reshape(_batch(obs), -1)


# ---------------------------------------------------------------- exact (dense) posterior


@dataclass
class _Rows:
    """The informative rows of each sample's ``A`` (independent of the prior, so EM caches it):
    all non-zero rows, padded with zero rows to the batch's largest count ``k``.

    Stored densely (``a``), or, when every row picks a single coordinate (masks, noise), as
    that coordinate and its weight (``idx``, ``coef``), so products with ``Sigma`` are gathers.
    """

    y: Tensor  # (B, k) the matching entries of y, zero on padding rows
    valid: Tensor  # (B, k) float64, 1 on non-zero rows
    rows: Tensor | None  # (B, k) indices into flattened y; None when every row is kept
    s: float
    a: Tensor | None = None  # (B, k, D) float64
    idx: Tensor | None = None  # (B, k) coordinate each row picks
    coef: Tensor | None = None  # (B, k) float64 weight of that coordinate, 0 on padding rows

    def take(self, v: Tensor) -> Tensor:
        """Restrict ``(B, m)`` to the kept rows, zero where A's row is zero (no information)."""
        if self.rows is not None:
            v = v.gather(1, self.rows)
        return v * self.valid

    def apply(self, x: Tensor) -> Tensor:
        """``A x`` on the kept rows for ``x`` ``(D,)`` or ``(B, D)``."""
        if self.a is not None:
            return self.a @ x if x.dim() == 1 else (self.a @ x[..., None])[..., 0]
        picked = x[self.idx] if x.dim() == 1 else x.gather(1, self.idx)
        return self.coef * picked

    def times_cov(self, cov: Tensor) -> Tensor:
        """``A Sigma`` ``(B, k, D)``."""
        if self.a is not None:
            b, k, d = self.a.shape
            return (self.a.reshape(-1, d) @ cov).view(b, k, d)
        return self.coef[..., None] * cov[self.idx]

    def s_matrix(self, cov: Tensor) -> tuple[Tensor, Tensor | None]:
        """``A Sigma A^T`` ``(B, k, k)``, and ``A Sigma`` when it was formed on the way (dense)."""
        if self.a is not None:
            a_cov = self.times_cov(cov)
            return a_cov @ self.a.transpose(1, 2), a_cov
        picked = cov[self.idx[:, :, None], self.idx[:, None, :]]
        return self.coef[:, :, None] * picked * self.coef[:, None, :], None

    def gain(self, cov: Tensor, sr: Tensor, a_cov: Tensor | None) -> Tensor:
        """``Sigma A^T v`` ``(B, D)`` for ``v = S^-1 r`` ``(B, k)``."""
        if a_cov is not None:
            return (sr[:, None, :] @ a_cov)[:, 0]
        u = sr.new_zeros(sr.shape[0], cov.shape[0]).scatter_add_(1, self.idx, self.coef * sr)
        return u @ cov

    def add_gram(self, acc: Tensor, s_inv: Tensor) -> None:
        """``acc += sum_i A_i^T S_i^-1 A_i`` (``acc`` ``(D, D)``)."""
        if self.a is not None:
            d = acc.shape[0]
            acc += self.a.reshape(-1, d).T @ (s_inv @ self.a).reshape(-1, d)
            return
        d = acc.shape[0]
        flat = (self.idx[:, :, None] * d + self.idx[:, None, :]).flatten()
        acc.view(-1).index_add_(0, flat, (self.coef[:, :, None] * s_inv * self.coef[:, None, :]).flatten())

    def subset(self, sel: Tensor, k: int) -> _Rows:
        """Samples ``sel``, first ``k`` rows."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sel, :k]

        return _Rows(
            y=cut(self.y),
            valid=cut(self.valid),
            rows=cut(self.rows),
            s=self.s,
            a=cut(self.a),
            idx=cut(self.idx),
            coef=cut(self.coef),
        )

    @property
    def nbytes(self) -> int:
        parts = (self.y, self.valid, self.rows, self.a, self.idx, self.coef)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _diagonal(channel: Channel, obs: Obs, shape: tuple[int, ...]) -> Tensor | None:
    """``diag(A)`` ``(B, D)`` when ``A`` is diagonal (masks, noise), tested on a random probe
    through both ``A`` and ``A^T``; ``None`` otherwise. Saves materialising ``A``."""
    b, d = _batch(obs), math.prod(shape)
    if _ydim(obs) != d:
        return None
    dev, dt = obs["y"].device, _dtype(obs)
    gen = torch.Generator(device=dev).manual_seed(1)
    z = torch.rand(b, d, generator=gen, device=dev, dtype=dt) + 0.5
    diag = _apply_a(channel, obs, torch.ones(b, d, dtype=dt, device=dev), shape)
    tol = 1e-5 * float(diag.abs().max()) + 1e-30
    for image in (_apply_a(channel, obs, z, shape), _apply_at(channel, obs, z, shape)):
        if float((image - diag * z).abs().max()) > tol:
            return None
    return diag.to(_F64)


def _rows(channel: Channel, obs: Obs, shape: tuple[int, ...]) -> _Rows:
    """Each sample's informative rows of ``A`` (from its diagonal, or materialised)."""
    s = float(channel.noise_std(obs))
    y = _flat_y(obs).to(_F64)
    diag = _diagonal(channel, obs, shape)
    if diag is not None:
        nz = diag != 0
        k = max(int(nz.sum(1).max()) if nz.numel() else 1, 1)
        rows = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = nz.gather(1, rows).to(_F64)
        rw = _Rows(y=y.gather(1, rows) * valid, valid=valid, rows=rows, s=s)
        rw.idx, rw.coef = rows, diag.gather(1, rows)
        return rw
    a_full = operator_matrix(channel, obs, shape)
    b, m, d = a_full.shape
    nnz = (a_full != 0).sum(-1)
    nz = nnz > 0
    k = max(int(nz.sum(1).max()) if b else 1, 1)
    if k < m:
        rows = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :k]
        a = a_full.gather(1, rows[..., None].expand(-1, -1, d))
        valid = nz.gather(1, rows).to(_F64)
        y = y.gather(1, rows)
    else:
        rows, a, valid = None, a_full, nz.to(_F64)
    rw = _Rows(y=y * valid, valid=valid, rows=rows, s=s)
    if bool((nnz <= 1).all()):
        rw.idx = a.abs().argmax(-1)
        rw.coef = a.gather(2, rw.idx[..., None])[..., 0]
    else:
        rw.a = a
    return rw


def _by_count(rw: _Rows, groups: int = 8) -> Iterator[_Rows]:
    """Regroup a batch by its number of informative rows, so each group pads only to its own
    largest count (masks vary a lot). Reorders samples: for order-free sums (EM) only."""
    counts = rw.valid.sum(1)
    b = counts.numel()
    if b < 2 * groups or float(counts.min()) >= 0.8 * float(counts.max()):
        yield rw
        return
    order = torch.argsort(counts)
    for sel in order.tensor_split(groups):
        yield rw.subset(sel, max(int(counts[sel].max()), 1))


def _solve(rw: _Rows, cov: Tensor, r: Tensor, jitter: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Factor ``S = A Sigma A^T + s^2 I`` (plus ``jitter`` times the mean informative variance,
    and 1 on padding rows, which carry nothing) and solve it against the residual ``r``.

    Returns ``(chol, S^-1, S^-1 r, A Sigma or None)``; the jitter grows x100 per retry if a
    factorisation fails.
    """
    valid = rw.valid
    s_mat, a_cov = rw.s_matrix(cov)
    diag = s_mat.diagonal(dim1=1, dim2=2)
    floor = 1e-12 * float(cov.diagonal().mean().clamp_min(1e-300))
    scale = ((diag * valid).sum(1) / valid.sum(1).clamp_min(1)).clamp_min(floor)
    base = diag.clone()
    for attempt in range(6):
        diag.copy_(base + valid * (rw.s**2 + jitter * 100.0**attempt * scale[:, None]) + (1 - valid))
        chol, info = torch.linalg.cholesky_ex(s_mat)
        if not bool((info > 0).any()):
            break
    else:
        raise DiffemError(
            "Gaussian posterior: A Sigma A^T + s^2 I is not positive definite (NaN in the data?)"
        )
    s_inv = torch.cholesky_inverse(chol)
    return chol, s_inv, (s_inv @ r[..., None])[..., 0], a_cov


def posterior_moments(
    prior: GaussianPrior, channel: Channel, obs: Obs, shape: tuple[int, ...], *, jitter: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Exact Gaussian posterior of ``x`` given ``y = A x + s eps``: mean ``(B, *shape)`` and
    covariance ``(B, D, D)``, both float64. ``jitter`` (relative to the mean of
    ``diag(A Sigma A^T)``) keeps the solve well posed when ``s = 0``."""
    _check_linear(channel)
    d = math.prod(shape)
    cov = prior.covariance().to(obs["y"].device)
    mu = prior.mean.to(cov)
    means, covs = [], []
    for part in _chunks(obs, 8 * (4 * _ydim(obs) * d + 2 * d * d)):
        rw = _rows(channel, part, shape)
        _, s_inv, sr, a_cov = _solve(rw, cov, rw.y - rw.apply(mu), jitter)
        a_cov = rw.times_cov(cov) if a_cov is None else a_cov
        means.append(mu + rw.gain(cov, sr, a_cov))
        c = cov - a_cov.transpose(1, 2) @ (s_inv @ a_cov)
        covs.append(0.5 * (c + c.transpose(1, 2)))
    return torch.cat(means).view(-1, *shape), torch.cat(covs)


# ---------------------------------------------------------------- matrix-free posterior samples


def _pcg(
    op: Callable[[Tensor], Tensor], precond: Callable[[Tensor], Tensor], rhs: Tensor, iters: int, tol: float
) -> Tensor:
    """Batched preconditioned conjugate gradients for SPD systems, one per row of ``rhs``; stops
    after ``iters`` steps or when every row's residual (preconditioned norm) fell by ``tol``."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(1)
    stop = tol * tol * rz
    for _ in range(iters):
        if bool((rz <= stop).all()):
            break
        q = op(p)
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-300), 0.0)[:, None]
        x = x + alpha * p
        r = r - alpha * q
        z = precond(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), 0.0)[:, None]
        p = z + beta * p
        rz = rz_new
    return x


def _cg_sample(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    z: Tensor,
    iters: int,
    tol: float,
    jitter: float,
) -> Tensor:
    """Matheron's rule ``x = x0 + Sigma A^T (A Sigma A^T + s^2 I)^-1 (y - A x0 - s eps)`` with a
    Woodbury-preconditioned CG solve (diagonal of ``A diag A^T`` by Rademacher probes, exact
    for masks, plus ``(A F)(A F)^T``)."""
    b, dev, dt = _batch(obs), obs["y"].device, _dtype(obs)
    d, nd = prior.dim, prior.noise_dim
    dvec = prior.diag.to(dev, dt)
    fac = prior.factor.to(dev, dt)
    if fac.shape[1] and not bool(fac.any()):
        fac = fac[:, :0]
    s = float(channel.noise_std(obs))

    def sigma(u: Tensor) -> Tensor:
        return dvec * u + (u @ fac) @ fac.T if fac.shape[1] else dvec * u

    z = z.to(dev, dt)
    x0 = (prior if prior.mean.device == dev else prior.to(dev)).draw(z[:, :nd])
    y = _flat_y(obs).to(dt)
    rhs = y - _apply_a(channel, obs, x0, shape) - s * z[:, nd:]

    gen = torch.Generator(device=dev).manual_seed(0)
    est = []
    for _ in range(2):
        e = torch.randint(0, 2, y.shape, generator=gen, device=dev).to(dt) * 2 - 1
        est.append(e * _apply_a(channel, obs, dvec * _apply_at(channel, obs, e, shape), shape))
    pd = 0.5 * (est[0] + est[1])
    # Two Rademacher probes agree exactly when A diag(d) A^T is diagonal (masks); otherwise the
    # per-row estimates are noise and only their mean (trace / m) is trusted.
    exact = ((est[0] - est[1]).abs() <= 1e-4 * pd.abs() + 1e-30).all(1, keepdim=True)
    pd = torch.where(exact, pd, pd.mean(1, keepdim=True)).clamp_min(0)
    rank = fac.shape[1]
    u = y.new_empty(b, rank, y.shape[1])  # rows of (A F)^T, only to build the Woodbury core
    for j in range(rank):
        u[:, j] = _apply_a(channel, obs, fac[:, j].expand(b, d), shape)
    mean_diag = pd.mean(1, keepdim=True) + torch.linalg.vector_norm(u, dim=(1, 2))[:, None] ** 2 / y.shape[1]
    delta = jitter * mean_diag.clamp_min(torch.finfo(dt).tiny)
    pinv = 1.0 / (pd.clamp_min(0.05 * pd.mean(1, keepdim=True)) + s * s + delta)
    if rank:
        # M = P + (A F)(A F)^T; M^-1 v = P^-1 v - P^-1 A F K^-1 F^T A^T P^-1 v, K = I + F^T A^T P^-1 A F
        u.mul_(pinv.sqrt()[:, None, :])
        core = torch.eye(rank, dtype=dt, device=dev) + u @ u.transpose(1, 2)
        core_inv = torch.cholesky_inverse(torch.linalg.cholesky(core))
        del u

        def precond(v: Tensor) -> Tensor:
            w = pinv * v
            t = (core_inv @ (_apply_at(channel, obs, w, shape) @ fac)[..., None])[..., 0]
            return w - pinv * _apply_a(channel, obs, t @ fac.T, shape)
    else:

        def precond(v: Tensor) -> Tensor:
            return pinv * v

    def op(v: Tensor) -> Tensor:
        return _apply_a(channel, obs, sigma(_apply_at(channel, obs, v, shape)), shape) + (s * s + delta) * v

    v = _pcg(op, precond, rhs, iters, tol)
    return x0 + sigma(_apply_at(channel, obs, v, shape))


def _sample_from_noise(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    z: Tensor,
    method: str,
    cg_iters: int,
    cg_tol: float,
    jitter: float,
) -> Tensor:
    """Posterior samples ``(B, *shape)`` (obs dtype) from standard normals ``z`` ``(B, noise_dim + m)``."""
    _check_linear(channel)
    if method == "auto":
        method = "dense" if prior.full else "cg"
    b, m, d = _batch(obs), _ydim(obs), math.prod(shape)
    if prior.dim != d:
        raise DiffemError(f"Gaussian prior has dimension {prior.dim}, data {shape} has {d}")
    dev, nd = obs["y"].device, prior.noise_dim
    out = []
    if method == "dense":
        pr = prior if prior.mean.device == dev else prior.to(dev)
        cov = pr.covariance()
        start = 0
        for part in _chunks(obs, 8 * 3 * m * d):
            n = _batch(part)
            zz = z[start : start + n].to(dev, _F64)
            start += n
            x0 = pr.draw(zz[:, :nd])
            rw = _rows(channel, part, shape)
            r = rw.y - rw.apply(x0) - rw.take(rw.s * zz[:, nd:])
            _, _, sr, a_cov = _solve(rw, cov, r, jitter)
            out.append(x0 + rw.gain(cov, sr, a_cov))
    elif method == "cg":
        if prior.full:
            raise ValueError("method 'cg' needs a low-rank-plus-diagonal prior")
        rank = prior.factor.shape[1]
        start = 0
        for part in _chunks(obs, 4 * (m * (rank + 8) + 8 * d)):
            n = _batch(part)
            out.append(
                _cg_sample(prior, channel, part, shape, z[start : start + n], cg_iters, cg_tol, jitter)
            )
            start += n
    else:
        raise ValueError(f"unknown method {method!r} (auto, dense, cg)")
    return torch.cat(out).to(_dtype(obs)).view(b, *shape)


def posterior_sample(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    *,
    method: str = "auto",
    cg_iters: int = 64,
    cg_tol: float = 1e-5,
    jitter: float | None = None,
) -> Tensor:
    """Exact posterior samples ``(B, *shape)`` by perturb-then-correct (Matheron's rule).

    ``method``: ``"dense"`` materialises ``A`` and solves by Cholesky (float64), ``"cg"`` solves
    matrix-free with conjugate gradients (low-rank priors), ``"auto"`` picks dense for a full
    covariance and cg otherwise. Both consume the same normals, so they agree up to CG tolerance.
    """
    dev = generator.device if generator is not None else obs["y"].device
    z = torch.randn(_batch(obs), prior.noise_dim + _ydim(obs), generator=generator, device=dev)
    return _sample_from_noise(
        prior, channel, obs, shape, z, method, cg_iters, cg_tol, _jit(method, prior, jitter)
    )


def _jit(method: str, prior: GaussianPrior, jitter: float | None) -> float:
    if jitter is not None:
        return jitter
    cg = method == "cg" or (method == "auto" and not prior.full)
    return 1e-6 if cg else 1e-8


def gaussian_start(
    prior: GaussianPrior,
    channel: Channel,
    obs_batches: ObsBatches | Iterable[Obs],
    shape: tuple[int, ...],
    seed: int,
    *,
    cg_iters: int = 64,
    cg_tol: float = 1e-5,
) -> Iterator[Tensor]:
    """One posterior sample per observation, in order, one ``(B, *shape)`` tensor per batch.

    Sample ``i`` draws its normals from its own seed ``(seed, START_TAG, i)``, so the result
    does not depend on the batch size (up to the CG tolerance on the matrix-free path).
    """
    batches = obs_batches() if callable(obs_batches) else obs_batches
    start = 0
    for obs in batches:
        b = _batch(obs)
        seeds = sample_seeds(seed, range(start, start + b), START_TAG)
        z = per_sample(seeds, (prior.noise_dim + _ydim(obs),)).to(obs["y"].device)
        start += b
        yield _sample_from_noise(
            prior, channel, obs, shape, z, "auto", cg_iters, cg_tol, _jit("auto", prior, None)
        )


# ---------------------------------------------------------------- EM on moments


def _initial_prior(
    channel: Channel, obs_batches: ObsBatches, shape: tuple[int, ...], full: bool, rank: int
) -> tuple[GaussianPrior, int]:
    """Mean 0 and ``c I`` with ``c`` matched to the observations' energy:
    ``E|y|^2 = c E||A||_F^2 + m s^2`` (``||A||_F^2`` by one Rademacher probe per sample)."""
    d = math.prod(shape)
    energy = fro = noise = 0.0
    n = 0
    dev = None
    gen: torch.Generator | None = None
    for obs in obs_batches():
        b, dt = _batch(obs), _dtype(obs)
        dev = obs["y"].device
        if gen is None:
            gen = torch.Generator(device=dev).manual_seed(0)
        e = torch.randint(0, 2, (b, d), generator=gen, device=dev).to(dt) * 2 - 1
        fro += float(_apply_a(channel, obs, e, shape).to(_F64).square().sum())
        energy += float(_flat_y(obs).to(_F64).square().sum())
        noise += b * _ydim(obs) * float(channel.noise_std(obs)) ** 2
        n += b
    if n == 0:
        raise DiffemError("no observations to fit the Gaussian start to")
    if fro <= 0:
        raise DiffemError(f"channel {channel.name!r} observes nothing (A = 0 on every sample)")
    c = max(energy - noise, 0.1 * energy, 1e-12 * fro) / fro
    mean = torch.zeros(d, dtype=_F64, device=dev)
    if full:
        return GaussianPrior(mean=mean, cov=c * torch.eye(d, dtype=_F64, device=dev)), n
    f32 = torch.float32
    return GaussianPrior(
        mean=mean.to(f32),
        diag=torch.full((d,), c, dtype=f32, device=dev),
        factor=torch.zeros(d, rank, device=dev),
    ), n


def _row_batches(
    channel: Channel, obs_batches: ObsBatches, shape: tuple[int, ...], cache_bytes: int
) -> Callable[[], Iterable[_Rows]]:
    """Informative rows of ``A`` for every observation, as a re-iterable: held in memory when
    they fit in ``cache_bytes`` (``A`` does not change across EM iterations), else recomputed."""
    d = math.prod(shape)

    def stream() -> Iterator[_Rows]:
        for obs in obs_batches():
            for part in _chunks(obs, 8 * 3 * _ydim(obs) * d):
                yield from _by_count(_rows(channel, part, shape))

    held: list[_Rows] = []
    size = 0
    for rw in stream():
        held.append(rw)
        size += rw.nbytes
        if size > cache_bytes:
            return stream
    return lambda: held


def _em_full_step(
    prior: GaussianPrior, row_batches: Callable[[], Iterable[_Rows]], jitter: float
) -> tuple[GaussianPrior, dict[str, float]]:
    """One exact EM step: mu = mean of posterior means, Sigma = mean of (C_i + (m_i - mu)(m_i - mu)^T).

    Accumulates sum of (m_i - mu_old), sum of their outer products and sum of A_i^T S_i^-1 A_i,
    since mean C_i = Sigma - Sigma (mean A_i^T S_i^-1 A_i) Sigma.
    """
    cov = prior.cov.to(_F64)
    mu = prior.mean.to(_F64)
    d = mu.numel()
    sum_dev = torch.zeros(d, dtype=_F64, device=cov.device)
    sum_out = torch.zeros(d, d, dtype=_F64, device=cov.device)
    gain = torch.zeros(d, d, dtype=_F64, device=cov.device)
    quad = torch.zeros((), dtype=_F64, device=cov.device)
    pivots: list[Tensor] = []
    n = 0
    for rw in row_batches():
        r = rw.y - rw.apply(mu)
        chol, s_inv, sr, a_cov = _solve(rw, cov, r, jitter)
        dev_ = rw.gain(cov, sr, a_cov)
        sum_dev += dev_.sum(0)
        sum_out += dev_.T @ dev_
        rw.add_gram(gain, s_inv)
        quad += (r * sr).sum() + rw.valid.sum() * math.log(2 * math.pi)
        pivots.append(chol.diagonal(dim1=1, dim2=2).flatten())
        n += r.shape[0]
    shift = sum_dev / n
    new = cov - cov @ (gain / n) @ cov + sum_out / n - torch.outer(shift, shift)
    new = 0.5 * (new + new.T)
    loglik = -0.5 * float(quad + 2 * torch.cat(pivots).log().sum()) / n
    return GaussianPrior(mean=mu + shift, cov=new), {"loglik": loglik}


def _em_lowrank_step(
    prior: GaussianPrior,
    channel: Channel,
    obs_batches: ObsBatches,
    shape: tuple[int, ...],
    rank: int,
    n_total: int,
    generator: torch.Generator,
    max_pca_samples: int,
    cg_iters: int,
    cg_tol: float,
) -> tuple[GaussianPrior, dict[str, float]]:
    """One stochastic EM step: posterior samples, then mean, per-pixel variance, and a rank-r PCA
    (``torch.pca_lowrank`` on an evenly strided subset) with the diagonal taking the rest."""
    d = math.prod(shape)
    stride = max(1, -(-n_total // max_pca_samples))
    total = sq = None
    kept: list[Tensor] = []
    n = 0
    for obs in obs_batches():
        b = _batch(obs)
        z = torch.randn(b, prior.noise_dim + _ydim(obs), generator=generator, device=generator.device)
        x = _sample_from_noise(
            prior, channel, obs, shape, z.to(obs["y"].device), "cg", cg_iters, cg_tol, 1e-6
        )
        x = x.reshape(b, d).float()
        x64 = x.to(_F64)
        total = x64.sum(0) if total is None else total + x64.sum(0)
        sq = x64.square().sum(0) if sq is None else sq + x64.square().sum(0)
        idx = torch.arange(n, n + b, device=x.device)
        kept.append(x[(idx % stride) == 0])
        n += b
    mean = total / n
    var = (sq / n - mean.square()).clamp_min(0)
    centred = torch.cat(kept) - mean.float()
    q = min(rank + 10, *centred.shape)
    with torch.random.fork_rng(devices=[centred.device] if centred.is_cuda else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
        _, sv, vec = torch.pca_lowrank(centred, q=q, center=False, niter=4)
    r = min(rank, q)
    factor = vec[:, :r] * (sv[:r] / math.sqrt(centred.shape[0]))
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(d, rank - r)], 1)
    floor = 1e-3 * float(var.mean().clamp_min(1e-12))
    diag = (var - factor.to(_F64).square().sum(1)).clamp_min(floor)
    return GaussianPrior(mean=mean.float(), diag=diag.float(), factor=factor.float()), {
        "var": float(var.mean())
    }


def _as_form(prior: GaussianPrior, full: bool, rank: int) -> GaussianPrior:
    """``prior`` converted to a full covariance or to rank-``rank`` plus diagonal."""
    if full:
        return prior if prior.full else GaussianPrior(mean=prior.mean.to(_F64), cov=prior.covariance())
    if not prior.full and prior.factor.shape[1] == rank:
        return prior
    cov = prior.covariance()
    vals, vecs = torch.linalg.eigh(cov)
    r = min(rank, prior.dim)
    factor = vecs[:, -r:] * vals[-r:].clamp_min(0).sqrt()
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(prior.dim, rank - r)], 1)
    diag = (cov.diagonal() - factor.square().sum(1)).clamp_min(1e-3 * float(cov.diagonal().mean()))
    return GaussianPrior(mean=prior.mean.float(), diag=diag.float(), factor=factor.float())


def fit_gaussian(
    channel: Channel,
    obs_batches: ObsBatches,
    shape: tuple[int, ...],
    iters: int = 16,
    full_max_dim: int = 1024,
    rank: int = 32,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    init: GaussianPrior | None = None,
    *,
    jitter: float = 1e-8,
    cg_iters: int = 64,
    cg_tol: float = 1e-5,
    max_pca_samples: int = 8192,
    cache_bytes: int = 2**29,
) -> GaussianPrior:
    """Fit ``N(mu, Sigma)`` to observations of a linear channel by ``iters`` EM iterations.

    ``obs_batches()`` returns a fresh iterable of observation dicts each call (one pass per
    iteration). Up to ``full_max_dim`` dimensions the covariance is full and EM exact; beyond,
    it is ``rank`` factors plus a diagonal, fitted by stochastic EM (posterior samples drawn
    with ``generator``, default seed 0). ``progress(i, iters, stats)`` is called after each
    iteration; ``stats`` holds ``loglik`` (mean log-likelihood per observation, exact EM, under
    the prior before the step) or ``var`` (mean per-dimension variance, stochastic EM).
    """
    _check_linear(channel)
    shape = tuple(shape)
    full = math.prod(shape) <= full_max_dim
    if init is None:
        prior, n_total = _initial_prior(channel, obs_batches, shape, full, rank)
    else:
        prior = _as_form(init, full, rank)
        n_total = 0 if full else sum(_batch(o) for o in obs_batches())
    if not full:
        if generator is None:
            generator = torch.Generator(device=prior.mean.device).manual_seed(0)
    if full:
        row_batches = _row_batches(channel, obs_batches, shape, cache_bytes)
    for i in range(iters):
        if full:
            prior, stats = _em_full_step(prior, row_batches, jitter)
        else:
            prior, stats = _em_lowrank_step(
                prior,
                channel,
                obs_batches,
                shape,
                rank,
                n_total,
                generator,
                max_pca_samples,
                cg_iters,
                cg_tol,
            )
        if progress is not None:
            progress(i + 1, iters, stats)
    return prior
