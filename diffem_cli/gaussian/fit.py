"""Lap 0 of DiffEM: a Gaussian prior fitted to corrupted observations by EM on moments
(:func:`fit_gaussian`), and one Gaussian posterior sample per observation that starts the EM loop
(:func:`gaussian_start`).

Works for any linear channel ``y = A x + s * eps`` (the channel offers ``A``, ``A^T`` and
``s``) and data of any shape, flattened to dimension ``D``. Two regimes:

* ``D <= full_max_dim`` (128 here, 768 in ``em.gaussian_full_max_dim``): a full covariance and exact
  EM. Each sample's ``A`` is read off the channel (its diagonal when ``A`` is diagonal, as for
  masks; else materialised on basis vectors) and the posterior solved by batched float64
  Cholesky on the informative rows only. Above ``WARM_FULL_DIM`` exact EM from the isotropic
  start converges too slowly, so the low-rank fit below comes first and ``iters // 4`` exact
  iterations refine it (a blur's spectral fit, already exact, is kept as it is).
* larger ``D`` (images): ``Sigma = D + F F^T`` with ``F`` of rank ``r``, fitted as in the
  official code by stochastic EM on posterior samples (Matheron's rule) with a PCA M-step, on
  an evenly strided subset of the observations. All float32 and batched. The posterior solve
  depends on the operator, found by probing the channel once
  (:func:`~diffem_cli.gaussian.operators.classify`); the fitted prior carries that probe
  (``GaussianPrior.probed``) so that :func:`gaussian_start` on the same channel reuses it.

Every entry point takes ``device``: the linear algebra runs there, results come back on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
from torch import Tensor

from diffem_channels.base import Channel, per_sample, sample_seeds
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.cosine import cosine_basis
from diffem_cli.gaussian.linalg import conjugate_gradient, fixed_signs, from_coords, ppca, to_coords
from diffem_cli.gaussian.operators import (
    Obs,
    Operator,
    Probed,
    Rows,
    Spectral,
    apply_a,
    apply_at,
    batch_size,
    by_count,
    check_linear,
    chunks,
    classify,
    diagonal_of,
    flat_y,
    informative_rows,
    obs_dtype,
    obs_to,
    shares,
    y_dim,
)
from diffem_cli.gaussian.posterior import (
    LowRankPosterior,
    default_jitter,
    lowrank_pass,
    sample_from_noise,
    solve_rows,
)
from diffem_cli.gaussian.prior import GaussianPrior
from diffem_cli.gaussian.shrinkage import FOLDS, GRID, shrinkage_target, shrunk
from diffem_cli.gaussian.spectrum import fit_power_spectrum, grid_frequencies

ObsBatches = Callable[[], Iterable[Obs]]
ProgressFn = Callable[[int, int, dict[str, float]], None]

START_TAG = 0x6761757373  # keeps the Gaussian start's draws apart from the channel's own streams
_F64 = torch.float64


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the small-matrix full-covariance path on one CPU thread: its many small LAPACK calls do
    not gain from a second thread, and under load OpenMP threads spinning against other jobs slow
    it down many times over."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


RESIDUALS: tuple[str, ...] = ("auto", "pixel", "cosine")
COSINE_AUTO_PIXELS = 1024  # auto takes the cosine residual up to 32x32: its dense basis costs (H W)^2
COSINE_MAX_PIXELS = 4096  # a 64x64 basis is 64 MiB of float32
WARM_FULL_DIM = 128  # above it a full-covariance fit starts from the low-rank one
INIT_MEAN_ITERS = 8  # CG steps for the initial mean; stopping early regularises an ill-posed A
INIT_POWER_ITERS = 10  # power iterations for each sample's ||A_i||_2^2


def _initial_prior(
    channel: Channel, obs_batches: ObsBatches, shape: tuple[int, ...], full: bool, rank: int
) -> tuple[GaussianPrior, int]:
    """The prior EM starts from: ``N(mu, c I)``.

    ``mu`` solves the normal equations ``sum A_i^T A_i mu = sum A_i^T y_i`` by a few conjugate
    gradient steps. ``c`` matches the centred observation energy ``E|y - A mu|^2 - m s^2`` as if
    every direction passed at the operator's largest gain, ``c d E||A_i||_2^2``: directions the
    channel barely observes (the high frequencies a blur removes) keep about their initial
    variance through EM, so ``c`` errs small rather than filling them with noise.
    """
    d = math.prod(shape)
    batches = list(obs_batches())
    if not batches or sum(batch_size(o) for o in batches) == 0:
        raise DiffemError("no observations to fit the Gaussian start to")
    dev = batches[0]["y"].device

    def normal(v: Tensor) -> Tensor:
        total = torch.zeros_like(v)
        for obs in batches:
            rows = v.to(obs_dtype(obs)).expand(batch_size(obs), d)
            total += apply_at(channel, obs, apply_a(channel, obs, rows, shape), shape).to(_F64).sum(0)
        return total

    rhs = sum(apply_at(channel, obs, flat_y(obs), shape).to(_F64).sum(0) for obs in batches)
    mu = conjugate_gradient(normal, rhs.view(1, d), INIT_MEAN_ITERS).view(d)
    energy = noise = gain = 0.0
    n = 0
    gen = torch.Generator(device=dev).manual_seed(0)
    for obs in batches:
        b, dt = batch_size(obs), obs_dtype(obs)
        rows = mu.to(dt).expand(b, d)
        energy += float((flat_y(obs).to(_F64) - apply_a(channel, obs, rows, shape).to(_F64)).square().sum())
        noise += b * y_dim(obs) * float(channel.noise_std(obs)) ** 2
        v = torch.randint(0, 2, (b, d), generator=gen, device=dev).to(dt) * 2 - 1
        norm = torch.ones(b, 1, dtype=dt, device=dev)
        for _ in range(INIT_POWER_ITERS):
            v = apply_at(channel, obs, apply_a(channel, obs, v, shape), shape)
            norm = v.norm(dim=1, keepdim=True)
            v = v / norm.clamp_min(torch.finfo(dt).tiny)
        gain += float(norm.to(_F64).sum())
        n += b
    if gain <= 0:
        raise DiffemError(f"channel {channel.name!r} observes nothing (A = 0 on every sample)")
    c = max(energy - noise, 0.1 * energy, 1e-12 * gain) / (d * gain)
    if full:
        return GaussianPrior(mean=mu, cov=c * torch.eye(d, dtype=_F64, device=dev)), n
    f32 = torch.float32
    return GaussianPrior(
        mean=mu.to(f32),
        diag=torch.full((d,), c, dtype=f32, device=dev),
        factor=torch.zeros(d, rank, device=dev),
    ), n


def _row_batches(
    channel: Channel, obs_batches: ObsBatches, shape: tuple[int, ...], cache_bytes: int
) -> Callable[[], Iterable[Rows]]:
    """Informative rows of ``A`` for every observation, as a re-iterable: held in memory when
    they fit in ``cache_bytes`` (``A`` does not change across EM iterations), else recomputed."""
    d = math.prod(shape)

    def stream() -> Iterator[Rows]:
        for obs in obs_batches():
            for part in chunks(obs, 8 * 3 * y_dim(obs) * d):
                yield from by_count(informative_rows(channel, part, shape))

    held: list[Rows] = []
    size = 0
    for rw in stream():
        held.append(rw)
        size += rw.nbytes
        if size > cache_bytes:
            return stream
    return lambda: held


def _em_full_step(
    prior: GaussianPrior, row_batches: Callable[[], Iterable[Rows]], jitter: float
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
    n = 0
    for rw in row_batches():
        r = rw.y - rw.apply(mu)
        chol, s_inv, sr, a_cov = solve_rows(rw, cov, r, jitter)
        dev_ = rw.gain(cov, sr, a_cov)
        sum_dev += dev_.sum(0)
        sum_out += dev_.T @ dev_
        rw.add_gram(gain, s_inv)
        quad += _neg2_loglik(rw, r, sr, chol)
        n += r.shape[0]
    shift = sum_dev / n
    new = cov - cov @ (gain / n) @ cov + sum_out / n - torch.outer(shift, shift)
    new = 0.5 * (new + new.T)
    return GaussianPrior(mean=mu + shift, cov=new), {"loglik": -0.5 * float(quad) / n}


def _neg2_loglik(rw: Rows, r: Tensor, sr: Tensor, chol: Tensor) -> Tensor:
    """``-2 log N(y; A mu, S)`` summed over the rows of ``rw`` (residuals ``r``, ``S^-1 r`` and the
    Cholesky factor of ``S``; padding rows, factored as 1, add nothing)."""
    logdet = 2 * chol.diagonal(dim1=1, dim2=2).log().sum()
    return (r * sr).sum() + rw.valid.sum() * math.log(2 * math.pi) + logdet


def _mean_loglik(prior: GaussianPrior, row_batches: Callable[[], Iterable[Rows]], jitter: float) -> float:
    """Mean log-likelihood per observation of the rows under a full-covariance ``prior``."""
    cov, mu = prior.cov.to(_F64), prior.mean.to(_F64)
    total = torch.zeros((), dtype=_F64, device=cov.device)
    n = 0
    for rw in row_batches():
        r = rw.y - rw.apply(mu)
        chol, _, sr, _ = solve_rows(rw, cov, r, jitter, inverse=False)
        total += _neg2_loglik(rw, r, sr, chol)
        n += r.shape[0]
    return -0.5 * float(total) / max(n, 1)


def _take(obs: Obs, sel: Tensor) -> Obs:
    """Observations ``sel`` of a batch: every per-sample tensor indexed, shared entries kept."""
    b = batch_size(obs)
    return {
        k: v[sel.to(v.device)] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
        for k, v in obs.items()
    }


def split_folds(obs_batches: ObsBatches, folds: int) -> tuple[ObsBatches, ObsBatches]:
    """``(kept, held)``: observation ``i`` held out when ``i % folds == 0``, kept otherwise."""

    def part(held: bool) -> ObsBatches:
        def gen() -> Iterator[Obs]:
            start = 0
            for obs in obs_batches():
                b = batch_size(obs)
                sel = torch.nonzero(((torch.arange(start, start + b) % folds) == 0) == held).flatten()
                start += b
                if len(sel):
                    yield _take(obs, sel)

        return gen

    return part(False), part(True)


def choose_start_shrinkage(
    channel: Channel,
    obs_batches: ObsBatches,
    shape: tuple[int, ...],
    fit: Callable[[ObsBatches], GaussianPrior],
    *,
    grid: Iterable[float] = GRID,
    folds: int = FOLDS,
    jitter: float = 1e-8,
    device: torch.device | None = None,
) -> float:
    """How far to shrink a full-covariance start (:func:`~diffem_cli.gaussian.shrinkage.shrink_prior`):
    ``fit`` on all observations but every ``folds``-th, then the amount in ``grid`` whose shrunk
    prior gives those held-out observations the highest marginal likelihood (ties to the
    smaller); 0 when that fit is not a full covariance."""
    kept, held = split_folds(obs_batches, folds)
    if next(iter(held()), None) is None or next(iter(kept()), None) is None:
        return 0.0
    prior = fit(kept)
    if not prior.full:
        return 0.0
    dev = torch.device(device) if device is not None else prior.cov.device
    prior = prior.to(dev)
    cov = prior.cov.to(_F64)
    target = shrinkage_target(cov, shape)
    rows = _row_batches(channel, lambda: (obs_to(o, dev) for o in held()), shape, 2**29)
    best, best_ll = 0.0, -math.inf
    with _one_thread(dev):
        for amount in grid:
            ll = _mean_loglik(replace(prior, cov=shrunk(cov, target, amount)), rows, jitter)
            if ll > best_ll:
                best, best_ll = float(amount), ll
    return best


def _subset(obs_batches: ObsBatches, n_total: int, max_fit: int, device: torch.device) -> Obs:
    """An evenly strided subset of at most ``max_fit`` observations, gathered on ``device``."""
    stride = max(1, -(-n_total // max_fit))
    parts: list[Obs] = []
    start = 0
    for obs in obs_batches():
        b = batch_size(obs)
        first = (-start) % stride
        if first < b:
            parts.append(_take(obs, torch.arange(first, b, stride)))
        start += b
    if not parts:
        raise DiffemError("no observations to fit the Gaussian start to")
    first_part = parts[0]
    return {
        k: torch.cat([p[k].to(device) for p in parts]) if torch.is_tensor(v) and v.dim() else v
        for k, v in first_part.items()
    }


def _em_lowrank(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    op: Operator,
    iters: int,
    rank: int,
    generator: torch.Generator,
    progress: ProgressFn | None,
    *,
    cg_iters: int,
    cg_tol: float,
    basis: Tensor | None = None,
) -> GaussianPrior:
    """Stochastic EM on ``obs`` (one batch, on the working device): each iteration draws one
    posterior sample per observation under the current prior and refits the prior to them, with
    the residual diagonal per pixel, or in ``basis`` (block-wise, see
    :class:`~diffem_cli.gaussian.prior.GaussianPrior`) when given."""
    n, m = batch_size(obs), y_dim(obs)
    # A does not change across iterations: read a diagonal operator off the channel once
    diag_a = diagonal_of(channel, obs, shape, torch.float32) if op.kind == "diagonal" else None
    if basis is not None:
        basis = basis.to(prior.mean.device, torch.float32)
    for i in range(iters):
        post = LowRankPosterior(prior, channel, shape, op, jitter=1e-5, cg_iters=cg_iters, cg_tol=cg_tol)
        z = torch.randn(n, prior.noise_dim + m, generator=generator, device=generator.device)
        x = lowrank_pass(post, obs, z.to(prior.mean.device), m, diag_a)
        warm = bool(prior.factor.any())
        if basis is None:
            mean, diag, factor = ppca(x, rank, prior.factor, generator, niter=2 if warm else 4)
            prior = GaussianPrior(mean=mean, diag=diag, factor=factor)
        else:
            previous = to_coords(prior.factor.T.contiguous(), basis).T
            mean, diag, factor = ppca(to_coords(x, basis), rank, previous, generator, niter=2 if warm else 4)
            prior = GaussianPrior(
                mean=from_coords(mean[None], basis)[0],
                diag=diag,
                factor=from_coords(factor.T.contiguous(), basis).T.contiguous(),
                basis=basis,
            )
        if progress is not None:
            progress(i + 1, iters, {"var": float(x.var(0).mean())})
    return prior


def _em_spectral(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    op: Operator,
    iters: int,
    rank: int,
    progress: ProgressFn | None,
    fresh: bool,
) -> GaussianPrior:
    """Exact EM for a symmetric ``A`` shared by all samples, in its eigen-coordinates ``w = V^T x``
    where ``A = diag(lam)``. Every observation then has the same posterior covariance
    ``C = Sigma - K lam Sigma`` (``K = Sigma lam (lam Sigma lam + s^2)^-1``), and the spread of the
    posterior means is ``K S_y K^T`` with ``S_y`` the observations' covariance, read once: one
    iteration is a few ``D x D`` products whatever the number of observations, with no Monte
    Carlo noise. The prior comes back as rank-``rank`` factors plus a diagonal in that basis
    (``basis = V``).

    A ``fresh`` start on images takes its diagonal from a power law fitted to the observations
    (:mod:`~diffem_cli.gaussian.spectrum`) instead of the isotropic prior: EM keeps the initial
    variance of every direction the operator barely passes.
    """
    sp = Spectral.of_rows(op.rows, shape, float(channel.noise_std(op.one)), 1e-5)
    v = sp.basis
    k = v.shape[0]
    yc = torch.cat([sp.coords(flat_y(part)) for part in chunks(obs, 64 * y_dim(obs))]).to(_F64)
    n, d = yc.shape
    y_mean = yc.mean(0)
    y_cov = torch.cov(yc.T, correction=0)
    lam = sp.lam.to(_F64)
    mean = to_coords(prior.mean.to(_F64)[None], v.to(_F64))[0]
    if fresh and len(shape) == 3:
        energy = (yc - lam * mean).square().mean(0)
        freq = grid_frequencies(v, shape).repeat(d // k)
        cov = torch.diag(fit_power_spectrum(energy, lam, freq, sp.s**2, d // k))
    else:
        vb = v.to(_F64)
        cov = to_coords(to_coords(prior.covariance(), vb).T.contiguous(), vb)  # V^T Sigma V
    eye = torch.eye(d, dtype=_F64, device=cov.device)
    for i in range(iters):
        noise = sp.noise(cov.diagonal()) ** 2
        s_mat = lam[:, None] * cov * lam[None, :] + noise * eye
        chol = torch.linalg.cholesky(0.5 * (s_mat + s_mat.T))
        gain = torch.cholesky_solve(lam[:, None] * cov, chol).T  # K = Sigma lam S^-1
        r = y_mean - lam * mean
        if progress is not None:
            quad = torch.trace(torch.cholesky_solve(y_cov + torch.outer(r, r), chol))
            logdet = 2 * chol.diagonal().log().sum()
            progress(i + 1, iters, {"loglik": -0.5 * float(quad + logdet + d * math.log(2 * math.pi))})
        mean = mean + gain @ r
        cov = cov - (gain * lam) @ cov + gain @ y_cov @ gain.T
        cov = 0.5 * (cov + cov.T)
    vals, vecs = torch.linalg.eigh(cov)
    r = min(rank, d)
    factor = fixed_signs(vecs[:, -r:]) * vals[-r:].clamp_min(0).sqrt()
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(d, rank - r)], 1)
    floor = 1e-6 * float(cov.diagonal().mean().clamp_min(1e-30))
    diag = (cov.diagonal() - factor.square().sum(1)).clamp_min(floor)
    return GaussianPrior(
        mean=from_coords(mean[None].float(), v)[0],
        diag=diag.float(),
        factor=from_coords(factor.float().T.contiguous(), v).T.contiguous(),
        basis=v,
    )


def _as_form(prior: GaussianPrior, full: bool, rank: int) -> GaussianPrior:
    """``prior`` converted to a full covariance or to rank-``rank`` plus diagonal."""
    if full:
        return prior if prior.full else GaussianPrior(mean=prior.mean.to(_F64), cov=prior.covariance())
    if not prior.full and prior.factor.shape[1] == rank:
        return prior
    cov = prior.covariance()
    vals, vecs = torch.linalg.eigh(cov)
    r = min(rank, prior.dim)
    factor = fixed_signs(vecs[:, -r:]) * vals[-r:].clamp_min(0).sqrt()
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(prior.dim, rank - r)], 1)
    diag = (cov.diagonal() - factor.square().sum(1)).clamp_min(1e-3 * float(cov.diagonal().mean()))
    return GaussianPrior(mean=prior.mean.float(), diag=diag.float(), factor=factor.float())


def resolve_residual(residual: str, shape: tuple[int, ...], what: str = "a cosine residual") -> str:
    """The low-rank prior's residual for data ``shape``: ``pixel`` or ``cosine`` (``auto``: cosine
    for images of at most ``COSINE_AUTO_PIXELS`` pixels per channel); a one-line DiffemError for an
    unknown name, or for ``cosine`` on vectors or above ``COSINE_MAX_PIXELS`` pixels per channel
    (``what`` names the setting in that line)."""
    if residual not in RESIDUALS:
        raise DiffemError(f"unknown Gaussian residual {residual!r} (choose from {', '.join(RESIDUALS)})")
    if residual == "cosine" and len(shape) != 3:
        raise DiffemError(f"{what} needs images (C, H, W); the data have shape {shape}")
    pixels = math.prod(shape[1:]) if len(shape) == 3 else 0
    if residual == "cosine" and pixels > COSINE_MAX_PIXELS:
        raise DiffemError(
            f"{what} holds a dense basis of (H W)^2 entries: at most {COSINE_MAX_PIXELS} pixels "
            f"per channel, got {shape[1]}x{shape[2]} (use the pixel residual)"
        )
    if residual == "auto":
        return "cosine" if 0 < pixels <= COSINE_AUTO_PIXELS else "pixel"
    return residual


def fit_gaussian(
    channel: Channel,
    obs_batches: ObsBatches,
    shape: tuple[int, ...],
    iters: int = 16,
    full_max_dim: int = 128,
    rank: int = 32,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    init: GaussianPrior | None = None,
    *,
    jitter: float = 1e-8,
    cg_iters: int = 32,
    cg_tol: float = 1e-4,
    max_fit: int = 8192,
    cache_bytes: int = 2**29,
    shared_max_dim: int = 4096,
    device: torch.device | None = None,
    residual: str = "auto",
) -> GaussianPrior:
    """Fit ``N(mu, Sigma)`` to observations of a linear channel by ``iters`` EM iterations; the
    prior comes back on the CPU.

    ``obs_batches()`` returns a fresh iterable of observation dicts each call. Up to
    ``full_max_dim`` dimensions the covariance is full and EM exact (float64, every observation,
    one pass per iteration; above ``WARM_FULL_DIM`` started from the low-rank fit and refined by
    ``iters // 4`` exact iterations). Beyond, ``Sigma`` is ``rank`` factors plus a diagonal:
    in pixel coordinates, fitted by stochastic EM on an evenly strided subset of at most
    ``max_fit`` observations held on the device (posterior samples with normals from
    ``generator``, default seed 0, then the mean and a top-``rank`` PCA of the samples); or, for
    a symmetric ``A`` shared by all samples such as blur, by exact EM in ``A``'s eigenbasis
    (stored as ``basis``) on that subset. ``residual`` is where a prior that stays low rank has
    its residual diagonal on the pixel-coordinate path (the low-rank fit a full covariance starts
    from keeps it per pixel): ``pixel`` (independent pixels) or ``cosine`` (images
    only: each colour channel's 2-D cosine basis, a stationary residual; see
    :mod:`~diffem_cli.gaussian.cosine`; at most ``COSINE_MAX_PIXELS`` per channel), whose posteriors
    are then solved by CG; ``auto``: cosine for images of at most ``COSINE_AUTO_PIXELS`` pixels per
    channel, pixel otherwise.
    ``progress(i, iters, stats)`` is called after each iteration; ``stats`` holds ``loglik``
    (exact EM: mean log-likelihood per observation under the prior before the step) or ``var``
    (stochastic EM: mean per-dimension variance of the samples). ``device`` runs the linear
    algebra there (default: the observations' device); ``init`` restarts from a prior. A
    low-rank prior comes back with ``probed`` set: the operator classification of the fit, which
    :func:`gaussian_start` reuses for the same channel and shape.
    """
    check_linear(channel)
    shape = tuple(shape)
    residual = resolve_residual(residual, shape)
    full = math.prod(shape) <= full_max_dim
    first = next(iter(obs_batches()), None)
    if first is None:
        raise DiffemError("no observations to fit the Gaussian start to")
    dev = torch.device(device) if device is not None else first["y"].device
    if full and init is None and math.prod(shape) > WARM_FULL_DIM:
        options = dict(jitter=jitter, cg_iters=cg_iters, cg_tol=cg_tol, max_fit=max_fit)
        options.update(cache_bytes=cache_bytes, shared_max_dim=shared_max_dim, device=device)
        options.update(residual="pixel")  # ``residual`` is for priors that stay low rank
        warm = fit_gaussian(
            channel, obs_batches, shape, iters, WARM_FULL_DIM, rank, generator, None, **options
        )
        if warm.basis is not None:
            return warm
        return fit_gaussian(
            channel,
            obs_batches,
            shape,
            max(1, iters // 4),
            full_max_dim,
            rank,
            None,
            progress,
            warm,
            **options,
        )
    if full:

        def moved() -> Iterator[Obs]:
            return (obs_to(o, dev) for o in obs_batches())

        with _one_thread(dev):
            if init is None:
                prior, _ = _initial_prior(channel, moved, shape, True, rank)
            else:
                prior = _as_form(init.to(dev), True, rank)
            row_batches = _row_batches(channel, moved, shape, cache_bytes)
            for i in range(iters):
                prior, stats = _em_full_step(prior, row_batches, jitter)
                if progress is not None:
                    progress(i + 1, iters, stats)
        return prior.to("cpu")
    n_total = sum(batch_size(o) for o in obs_batches())
    obs = _subset(obs_batches, n_total, max_fit, dev)
    if init is None:
        prior, _ = _initial_prior(channel, lambda: [obs], shape, False, rank)
    else:
        prior = _as_form(init, False, rank).to(dev)
    if generator is None:
        generator = torch.Generator(device=dev).manual_seed(0)
    elif generator.device != dev:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        generator = torch.Generator(device=dev).manual_seed(seed)
    op = classify(channel, obs, shape, shared_max_dim)
    if op.kind == "symmetric":
        prior = _em_spectral(prior, channel, obs, shape, op, iters, rank, progress, init is None)
    else:
        basis = cosine_basis(shape[1], shape[2]) if residual == "cosine" else None
        prior = _em_lowrank(
            prior,
            channel,
            obs,
            shape,
            op,
            iters,
            rank,
            generator,
            progress,
            cg_iters=cg_iters,
            cg_tol=cg_tol,
            basis=basis,
        )
    return replace(prior.to("cpu"), probed=Probed(channel, shape, op))


def gaussian_start(
    prior: GaussianPrior,
    channel: Channel,
    obs_batches: ObsBatches | Iterable[Obs],
    shape: tuple[int, ...],
    seed: int,
    *,
    cg_iters: int = 32,
    cg_tol: float = 1e-4,
    device: torch.device | None = None,
    shared_max_dim: int = 4096,
) -> Iterator[Tensor]:
    """One posterior sample per observation, in order, one CPU ``(B, *shape)`` tensor per batch.

    Sample ``i`` draws its normals from its own seed ``(seed, START_TAG, i)``, so the result
    does not depend on the batch size (up to float32 rounding, or the CG tolerance on the
    matrix-free path). ``device`` runs the linear algebra there (batches are moved to it). A
    low-rank prior with ``probed`` (from :func:`fit_gaussian` on this channel and shape) skips
    probing the channel again, as long as each batch shares the ``A`` it probed.
    """
    check_linear(channel)
    shape = tuple(shape)
    batches = obs_batches() if callable(obs_batches) else obs_batches
    start = 0
    post: LowRankPosterior | None = None
    pr: GaussianPrior | None = None
    for obs in batches:
        b = batch_size(obs)
        dev = torch.device(device) if device is not None else obs["y"].device
        obs = obs_to(obs, dev)
        if pr is None:
            pr = prior.to(dev)
        seeds = sample_seeds(seed, range(start, start + b), START_TAG)
        z = per_sample(seeds, (prior.noise_dim + y_dim(obs),)).to(dev)
        start += b
        if pr.full:
            with _one_thread(dev):
                x = sample_from_noise(
                    pr, channel, obs, shape, z, "dense", cg_iters, cg_tol, default_jitter("dense", pr, None)
                )
        else:
            if post is None:
                op = None if prior.probed is None else prior.probed.operator_for(channel, shape, dev)
                if op is None or (op.kind != "diagonal" and not shares(op, channel, obs, shape)):
                    op = classify(channel, obs, shape, shared_max_dim)
                post = LowRankPosterior(pr, channel, shape, op, jitter=1e-5, cg_iters=cg_iters, cg_tol=cg_tol)
            x = lowrank_pass(post, obs, z, y_dim(obs)).to(obs_dtype(obs)).view(b, *shape)
        yield x.cpu()
