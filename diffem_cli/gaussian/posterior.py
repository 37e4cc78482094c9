"""Gaussian posteriors of ``x`` given ``y = A x + s eps``: exact moments, and samples and means by
Matheron's rule (perturb a prior draw, then correct it by the solve against the residual).

A full covariance is solved densely in float64 on each sample's informative rows of ``A``; a
low-rank-plus-diagonal prior in float32 by the cheapest exact route the operator allows
(:class:`LowRankPosterior`: Woodbury for a diagonal ``A``, the eigenbasis for a symmetric shared
``A``, one dense Cholesky for a shared ``A``), else matrix-free by preconditioned conjugate
gradients.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from diffem_channels.base import Channel
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.cosine import pixel_variances
from diffem_cli.gaussian.linalg import (
    conjugate_gradient,
    from_coords,
    packed_pairs,
    to_coords,
    woodbury_sample,
)
from diffem_cli.gaussian.operators import (
    Obs,
    Operator,
    Rows,
    Spectral,
    apply_a,
    apply_at,
    batch_size,
    check_linear,
    chunks,
    classify,
    diagonal_of,
    flat_y,
    informative_rows,
    obs_dtype,
    obs_to,
    on_rows,
    shares,
    y_dim,
)
from diffem_cli.gaussian.prior import GaussianPrior

_F64 = torch.float64


def solve_rows(
    rw: Rows, cov: Tensor, r: Tensor, jitter: float, *, inverse: bool = True
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Factor ``S = A Sigma A^T + s^2 I`` (plus ``jitter`` times the mean informative variance,
    and 1 on padding rows, which carry nothing) and solve it against the residual ``r``.

    Returns ``(chol, S^-1 or None, S^-1 r, A Sigma or None)``; ``S^-1`` is formed only with
    ``inverse`` (covariances and fits need it, means and samples only the solve, which costs a
    fraction of the inverse). The jitter grows x100 per retry if a factorisation fails.
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
    if not inverse:
        return chol, None, torch.cholesky_solve(r[..., None], chol)[..., 0], a_cov
    s_inv = torch.cholesky_inverse(chol)
    return chol, s_inv, (s_inv @ r[..., None])[..., 0], a_cov


def posterior_moments(
    prior: GaussianPrior, channel: Channel, obs: Obs, shape: tuple[int, ...], *, jitter: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Exact Gaussian posterior of ``x`` given ``y = A x + s eps``: mean ``(B, *shape)`` and
    covariance ``(B, D, D)``, both float64. ``jitter`` (relative to the mean of
    ``diag(A Sigma A^T)``) keeps the solve well posed when ``s = 0``."""
    check_linear(channel)
    d = math.prod(shape)
    cov = prior.covariance().to(obs["y"].device)
    mu = prior.mean.to(cov)
    means, covs = [], []
    for part in chunks(obs, 8 * (4 * y_dim(obs) * d + 2 * d * d)):
        rw = informative_rows(channel, part, shape)
        _, s_inv, sr, a_cov = solve_rows(rw, cov, rw.y - rw.apply(mu), jitter)
        a_cov = rw.times_cov(cov) if a_cov is None else a_cov
        means.append(mu + rw.gain(cov, sr, a_cov))
        c = cov - a_cov.transpose(1, 2) @ (s_inv @ a_cov)
        covs.append(0.5 * (c + c.transpose(1, 2)))
    return torch.cat(means).view(-1, *shape), torch.cat(covs)


class LowRankPosterior:
    """Posterior samples under a low-rank-plus-diagonal prior by Matheron's rule, all in float32:
    ``x = x0 + Sigma A^T (A Sigma A^T + s^2 I)^-1 (y - A x0 - s eps)`` with ``x0`` a prior draw.

    Exact by Woodbury when ``A`` is diagonal and the residual too (``r x r`` systems per sample);
    exact in the eigenbasis when ``A`` is symmetric, shared and the prior's basis is that
    eigenbasis; exact through one dense ``m x m`` Cholesky of ``A Sigma A^T + s^2 I`` when ``A`` is
    shared; otherwise a fixed number of preconditioned CG iterations.
    """

    def __init__(
        self,
        prior: GaussianPrior,
        channel: Channel,
        shape: tuple[int, ...],
        op: Operator,
        *,
        jitter: float,
        cg_iters: int,
        cg_tol: float,
    ) -> None:
        dev = prior.mean.device
        self.prior, self.channel, self.shape, self.op = prior, channel, shape, op
        self.jitter, self.cg_iters, self.cg_tol = jitter, cg_iters, cg_tol
        self.mean = prior.mean.to(dev, torch.float32)
        self.diag = prior.diag.to(dev, torch.float32).clamp_min(0)
        fac = prior.factor.to(dev, torch.float32)
        self.factor = fac if bool(fac.any()) else fac[:, :0]
        self.kind = op.kind
        self.spectral: Spectral | None = None
        if prior.basis is not None:
            if op.kind == "symmetric":
                s = float(channel.noise_std(op.one))
                self.spectral = Spectral.of_basis(prior.basis.to(dev, torch.float32), op, s, jitter)
            self.kind = (
                "spectral" if self.spectral is not None else "shared" if op.rows is not None else "general"
            )
        elif op.kind == "symmetric":
            self.kind = "shared"
        self.pairs = packed_pairs(self.factor) if self.factor.shape[1] else None
        self.s_inv: Tensor | None = None
        self.gain: Tensor | None = None
        self.rows_done = 0
        if self.kind == "spectral":
            v = self.spectral.basis
            self.cmean = to_coords(self.mean[None], v)[0]
            self.cfac = to_coords(self.factor.T.contiguous(), v).T.contiguous()
            self.cpairs = packed_pairs(self.cfac) if self.cfac.shape[1] else None
        if self.kind == "shared":
            self._factor_shared()

    def _factor_shared(self) -> None:
        """``S^-1`` for the shared ``S = A Sigma A^T + s^2 I`` (float32 Cholesky; ``jitter`` relative
        to the mean of ``diag(S)`` sets a floor under ``s^2``, raised x10 on failure)."""
        op = self.op
        self.sig_at = self.prior.matvec(op.rows)  # (m, D): row k is Sigma A^T e_k
        m = op.rows.shape[0]
        s_mat = on_rows(self.channel, op.one, self.sig_at, self.shape, adjoint=False)
        s_mat = 0.5 * (s_mat + s_mat.T)
        s2 = float(self.channel.noise_std(op.one)) ** 2
        scale = float(s_mat.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny))
        eye = torch.eye(m, device=s_mat.device)
        for attempt in range(6):
            chol, info = torch.linalg.cholesky_ex(s_mat + max(s2, self.jitter * 10.0**attempt * scale) * eye)
            if int(info) == 0:
                break
        else:
            raise DiffemError(
                "Gaussian posterior: A Sigma A^T + s^2 I is not positive definite (NaN in the data?)"
            )
        self.s_inv = torch.cholesky_inverse(chol)

    def sample(self, obs: Obs, z: Tensor, diag_a: Tensor | None = None) -> Tensor:
        """Posterior samples ``(B, D)`` float32 from standard normals ``z`` ``(B, D + r + m)``;
        ``diag_a``: the batch's ``diag(A)`` when already known (a diagonal operator)."""
        z = z.to(self.mean.device, torch.float32)
        s = float(self.channel.noise_std(obs))
        y = flat_y(obs).float()
        if self.kind == "diagonal":
            a = diag_a if diag_a is not None else diagonal_of(self.channel, obs, self.shape, torch.float32)
            if a is not None:
                rz = self.prior.factor.shape[1]
                return woodbury_sample(self.mean, self.diag, self.factor, self.pairs, a, y, z, s, rz)
        elif self.kind == "spectral" and shares(self.op, self.channel, obs, self.shape):
            sp = self.spectral
            rz = self.prior.factor.shape[1]
            w = sp.sample_coords(self.cmean, self.diag, self.cfac, self.cpairs, sp.coords(y), z, rz)
            return from_coords(w, sp.basis)
        elif self.kind == "shared" and shares(self.op, self.channel, obs, self.shape):
            return self._shared(obs, y, z, s)
        return _cg_sample(
            self.prior, self.channel, obs, self.shape, z, self.cg_iters, self.cg_tol, max(self.jitter, 1e-6)
        ).float()

    def _shared(self, obs: Obs, y: Tensor, z: Tensor, s: float) -> Tensor:
        """``x0 + (S^-1 r)^T (A Sigma)`` with the shared ``S^-1``; once more rows than ``m`` went
        through, the gain ``S^-1 A Sigma`` is formed so that each further batch is one product."""
        x0 = self.prior.draw(z[:, : self.prior.noise_dim])
        res = y - apply_a(self.channel, obs, x0, self.shape).float() - s * z[:, self.prior.noise_dim :]
        self.rows_done += x0.shape[0]
        if self.gain is None and self.rows_done > self.s_inv.shape[0]:
            self.gain = self.s_inv @ self.sig_at
        if self.gain is not None:
            return x0 + res @ self.gain
        return x0 + (res @ self.s_inv) @ self.sig_at


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
    Woodbury-preconditioned CG solve (diagonal of ``A diag(v) A^T``, ``v`` the residual's per-pixel
    variances, by Rademacher probes, exact for masks, plus ``(A F)(A F)^T``)."""
    b, dev, dt = batch_size(obs), obs["y"].device, obs_dtype(obs)
    d, nd = prior.dim, prior.noise_dim
    dvec = prior.diag.to(dev, dt)
    # the preconditioner needs the residual's variance per pixel, not per basis coordinate
    pixel_var = dvec if prior.basis is None else pixel_variances(dvec, prior.basis.to(dev, dt))
    fac = prior.factor.to(dev, dt)
    if fac.shape[1] and not bool(fac.any()):
        fac = fac[:, :0]
    s = float(channel.noise_std(obs))

    def sigma(u: Tensor) -> Tensor:
        if prior.basis is not None:
            return prior.to(dev).matvec(u) if prior.mean.device != dev else prior.matvec(u)
        return dvec * u + (u @ fac) @ fac.T if fac.shape[1] else dvec * u

    z = z.to(dev, dt)
    x0 = (prior if prior.mean.device == dev else prior.to(dev)).draw(z[:, :nd])
    y = flat_y(obs).to(dt)
    rhs = y - apply_a(channel, obs, x0, shape) - s * z[:, nd:]

    gen = torch.Generator(device=dev).manual_seed(0)
    est = []
    for _ in range(2):
        e = torch.randint(0, 2, y.shape, generator=gen, device=dev).to(dt) * 2 - 1
        est.append(e * apply_a(channel, obs, pixel_var * apply_at(channel, obs, e, shape), shape))
    pd = 0.5 * (est[0] + est[1])
    # Two Rademacher probes agree exactly when A diag(v) A^T is diagonal (masks); otherwise the
    # per-row estimates are noise and only their mean (trace / m) is trusted.
    exact = ((est[0] - est[1]).abs() <= 1e-4 * pd.abs() + 1e-30).all(1, keepdim=True)
    pd = torch.where(exact, pd, pd.mean(1, keepdim=True)).clamp_min(0)
    rank = fac.shape[1]
    u = y.new_empty(b, rank, y.shape[1])  # rows of (A F)^T, only to build the Woodbury core
    for j in range(rank):
        u[:, j] = apply_a(channel, obs, fac[:, j].expand(b, d), shape)
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
            t = (core_inv @ (apply_at(channel, obs, w, shape) @ fac)[..., None])[..., 0]
            return w - pinv * apply_a(channel, obs, t @ fac.T, shape)
    else:

        def precond(v: Tensor) -> Tensor:
            return pinv * v

    def op(v: Tensor) -> Tensor:
        return apply_a(channel, obs, sigma(apply_at(channel, obs, v, shape)), shape) + (s * s + delta) * v

    v = conjugate_gradient(op, rhs, iters, precond=precond, tol=tol)
    return x0 + sigma(apply_at(channel, obs, v, shape))


_METHODS = ("auto", "dense", "diagonal", "spectral", "shared", "cg")


def sample_from_noise(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    z: Tensor,
    method: str,
    cg_iters: int,
    cg_tol: float,
    jitter: float,
    shared_max_dim: int = 4096,
) -> Tensor:
    """Posterior samples ``(B, *shape)`` (obs dtype, obs device) from standard normals ``z``
    ``(B, noise_dim + m)``; ``prior`` must be on the observations' device."""
    check_linear(channel)
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r} ({', '.join(_METHODS)})")
    if method == "auto":
        method = "dense" if prior.full else "lowrank"
    b, m, d = batch_size(obs), y_dim(obs), math.prod(shape)
    if prior.dim != d:
        raise DiffemError(f"Gaussian prior has dimension {prior.dim}, data {shape} has {d}")
    dev, nd = obs["y"].device, prior.noise_dim
    out = []
    if method == "dense":
        cov = prior.covariance()
        start = 0
        for part in chunks(obs, 8 * 3 * m * d):
            n = batch_size(part)
            zz = z[start : start + n].to(dev, _F64)
            start += n
            x0 = prior.draw(zz[:, :nd])
            rw = informative_rows(channel, part, shape)
            r = rw.y - rw.apply(x0) - rw.take(rw.s * zz[:, nd:])
            _, _, sr, a_cov = solve_rows(rw, cov, r, jitter, inverse=False)
            out.append(x0 + rw.gain(cov, sr, a_cov))
        return torch.cat(out).to(obs_dtype(obs)).view(b, *shape)
    if prior.full:
        raise ValueError(f"method {method!r} needs a low-rank-plus-diagonal prior")
    op = Operator("general") if method == "cg" else classify(channel, obs, shape, shared_max_dim)
    if method == "shared" and op.kind == "symmetric":
        op = replace(op, kind="shared")
    post = LowRankPosterior(prior, channel, shape, op, jitter=jitter, cg_iters=cg_iters, cg_tol=cg_tol)
    if method not in ("lowrank", "cg") and post.kind != method:
        raise ValueError(f"method {method!r}: channel {channel.name!r} with this prior needs {post.kind!r}")
    return lowrank_pass(post, obs, z, m).to(obs_dtype(obs)).view(b, *shape)


def lowrank_pass(post: LowRankPosterior, obs: Obs, z: Tensor, m: int, diag_a: Tensor | None = None) -> Tensor:
    """``post.sample`` over ``obs`` in sub-batches that fit the memory budget (``diag_a``: the
    observations' ``diag(A)``, when known)."""
    d, r = post.mean.numel(), post.prior.factor.shape[1]
    per = 4 * (m * (r + 8) + 8 * d) if post.kind == "general" else 4 * (8 * (d + m) + r * (r + 2))
    out, start = [], 0
    for part in chunks(obs, per):
        n = batch_size(part)
        a = None if diag_a is None else diag_a[start : start + n]
        out.append(post.sample(part, z[start : start + n], a))
        start += n
    return torch.cat(out)


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
    device: torch.device | None = None,
) -> Tensor:
    """Posterior samples ``(B, *shape)`` by perturb-then-correct (Matheron's rule), on the CPU.

    ``method``: ``"dense"`` materialises ``A`` and solves by Cholesky (float64, exact); the others
    need a low-rank-plus-diagonal prior and work in float32: ``"diagonal"`` (diagonal ``A`` and
    residual: Woodbury), ``"spectral"`` (symmetric ``A`` shared by all samples, prior basis = its
    eigenbasis: Woodbury there), ``"shared"`` (one ``A`` for all samples: a dense Cholesky of
    ``A Sigma A^T + s^2 I``), ``"cg"`` (matrix-free conjugate gradients); ``"auto"`` picks dense
    for a full covariance and the best of the others by probing the channel. All consume the
    same normals (drawn on ``generator``'s device), so they agree up to float32 / CG accuracy.
    ``device`` runs the linear algebra there (default: the observations' device).
    """
    dev = torch.device(device) if device is not None else obs["y"].device
    gdev = generator.device if generator is not None else dev
    z = torch.randn(batch_size(obs), prior.noise_dim + y_dim(obs), generator=generator, device=gdev)
    pr = prior.to(dev)
    jit = default_jitter(method, pr, jitter)
    return sample_from_noise(
        pr, channel, obs_to(obs, dev), shape, z.to(dev), method, cg_iters, cg_tol, jit
    ).cpu()


def posterior_mean(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    *,
    method: str = "auto",
    cg_iters: int = 64,
    cg_tol: float = 1e-5,
    jitter: float | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Posterior means ``(B, *shape)`` on the CPU: Matheron's rule with all normals zero (then the
    prior draw is the prior mean and the correction is ``Sigma A^T S^-1 (y - A mu)``)."""
    dev = torch.device(device) if device is not None else obs["y"].device
    z = torch.zeros(batch_size(obs), prior.noise_dim + y_dim(obs), device=dev)
    pr = prior.to(dev)
    jit = default_jitter(method, pr, jitter)
    return sample_from_noise(pr, channel, obs_to(obs, dev), shape, z, method, cg_iters, cg_tol, jit).cpu()


def default_jitter(method: str, prior: GaussianPrior, jitter: float | None) -> float:
    """Default jitter: 1e-8 (dense, float64), 1e-6 (CG), 1e-5 (float32 factorisations: a floor under
    ``s^2`` only), each relative to the mean of ``diag(A Sigma A^T)``."""
    if jitter is not None:
        return jitter
    if method == "dense" or (method == "auto" and prior.full):
        return 1e-8
    return 1e-6 if method == "cg" else 1e-5
