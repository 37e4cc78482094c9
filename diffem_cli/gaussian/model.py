"""Lap 0 of DiffEM: a Gaussian prior fitted to corrupted observations by EM on moments, and
Gaussian posterior samples that start the EM loop.

Works for any linear channel ``y = A x + s * eps`` (the channel offers ``A``, ``A^T`` and
``s``) and data of any shape, flattened to dimension ``D``. Two regimes:

* ``D <= full_max_dim`` (128: the manifold, 8x8 digits): a full covariance and exact EM. Each
  sample's ``A`` is read off the channel (its diagonal when ``A`` is diagonal, as for masks;
  else materialised on basis vectors) and the posterior solved by batched float64 Cholesky on
  the informative rows only.
* larger ``D`` (images): ``Sigma = D + F F^T`` with ``F`` of rank ``r``, fitted as in the
  official code by stochastic EM on posterior samples (Matheron's rule) with a PCA M-step, on
  an evenly strided subset of the observations. All float32 and batched. The posterior solve
  depends on the operator, found by probing the channel: a diagonal ``A`` (masks, noise) is
  exact by Woodbury (one ``r x r`` Cholesky per sample, its matrix from one matrix product for
  the whole batch); an ``A`` shared by all samples (blur) is exact through one dense ``m x m``
  Cholesky of ``A Sigma A^T + s^2 I`` per prior, then matrix products; anything else is solved
  matrix-free by a fixed number of Woodbury-preconditioned CG iterations.

Every entry point takes ``device``: the linear algebra runs there, results come back on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from diffem_channels.base import Channel, per_sample, sample_seeds
from diffem_cli.core.errors import DiffemError

Obs = Mapping[str, Tensor]
ObsBatches = Callable[[], Iterable[Obs]]
ProgressFn = Callable[[int, int, dict[str, float]], None]

START_TAG = 0x6761757373  # keeps the Gaussian start's draws apart from the channel's own streams
_BUDGET = 2**28  # bytes of working memory per internal sub-batch
_F64 = torch.float64


def to_coords(v: Tensor, basis: Tensor) -> Tensor:
    """Rows ``v`` ``(B, D)`` in the block basis ``I (x) basis`` (each block of ``k`` times ``basis``)."""
    k = basis.shape[0]
    return (v.reshape(v.shape[0], -1, k) @ basis).reshape(v.shape)


def from_coords(w: Tensor, basis: Tensor) -> Tensor:
    """The inverse of :func:`to_coords` (the basis is orthonormal)."""
    k = basis.shape[0]
    return (w.reshape(w.shape[0], -1, k) @ basis.T).reshape(w.shape)


@dataclass(eq=False)
class GaussianPrior:
    """``N(mean, Sigma)`` on flattened data: ``Sigma = cov`` (full), or ``B diag(diag) B^T + factor
    factor^T`` with ``B`` the identity, or, when ``basis`` ``V`` ``(k, k)`` (orthonormal, ``k`` dividing
    ``D``) is given, ``I_{D/k} (x) V``: ``V`` acting on each consecutive block of ``k`` coordinates
    (each colour channel of an image). That basis is an operator's eigenbasis, in which the
    residual is diagonal (a spectrum)."""

    mean: Tensor
    cov: Tensor | None = None
    diag: Tensor | None = None
    factor: Tensor | None = None
    basis: Tensor | None = None
    _root: Tensor | None = field(default=None, init=False, repr=False)
    _probed: tuple | None = field(
        default=None, init=False, repr=False
    )  # (channel, shape, _Operator) of the fit

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean).flatten()
        d = self.mean.numel()
        if self.cov is not None:
            if self.diag is not None or self.factor is not None or self.basis is not None:
                raise ValueError("give either cov or diag (+ factor, basis), not both")
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
        if self.basis is not None:
            k = self.basis.shape[0]
            if self.basis.dim() != 2 or self.basis.shape[1] != k or d % k:
                raise ValueError(
                    f"basis must be square with a side dividing {d}, got {tuple(self.basis.shape)}"
                )

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
        if self.basis is not None:
            v = torch.block_diag(*[self.basis.to(_F64)] * (self.dim // self.basis.shape[0]))
            return (v * self.diag.to(_F64)) @ v.T + f @ f.T
        return torch.diag(self.diag.to(_F64)) + f @ f.T

    def matvec(self, u: Tensor) -> Tensor:
        """``Sigma u`` for rows ``u`` ``(B, D)`` of a low-rank-plus-diagonal prior, in ``u``'s dtype."""
        dvec, fac = self.diag.to(u), self.factor.to(u)
        if self.basis is not None:
            v = self.basis.to(u)
            out = from_coords(to_coords(u, v) * dvec, v)
        else:
            out = dvec * u
        return out + (u @ fac) @ fac.T if fac.shape[1] else out

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
        white = z[:, :d] * self.diag.to(z.dtype).clamp_min(0).sqrt()
        if self.basis is not None:
            white = from_coords(white, self.basis.to(z.dtype))
        out = self.mean.to(z.dtype) + white
        if self.factor.shape[1]:
            out = out + z[:, d:] @ self.factor.to(z.dtype).T
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``(n, D)`` as float32."""
        z = torch.randn(n, self.noise_dim, generator=generator, device=self.mean.device)
        return self.draw(z.to(_F64) if self.full else z).float()

    def to_tensors(self) -> dict[str, Tensor]:
        """Named contiguous tensors for safetensors storage."""
        named = {
            "mean": self.mean,
            "cov": self.cov,
            "diag": self.diag,
            "factor": self.factor,
            "basis": self.basis,
        }
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
            basis=tensors.get("basis"),
        )


# ---------------------------------------------------------------- channel plumbing


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the small-matrix full-covariance path on one CPU thread: its many small LAPACK calls do
    not gain from a second thread, and under load OpenMP threads spinning against other jobs made
    it 13x slower (digits lap 0: 16 s with 2 threads against 1.2 s with 1, load average 4)."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def _diagonal(channel: Channel, obs: Obs, shape: tuple[int, ...], dtype: torch.dtype = _F64) -> Tensor | None:
    """``diag(A)`` ``(B, D)`` in ``dtype`` when ``A`` is diagonal (masks, noise), tested on a random
    probe through both ``A`` and ``A^T``; ``None`` otherwise. Saves materialising ``A``."""
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
    return diag.to(dtype)


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


# ---------------------------------------------------------------- low-rank-plus-diagonal posterior


@dataclass(eq=False)
class _Operator:
    """How ``A`` acts on a set of observations, found by probing the channel once:

    * ``"diagonal"``: ``A`` is diagonal per sample (masks, noise), read off per batch;
    * ``"shared"``: every sample has the same ``A``, held densely as its rows ``(m, D)``;
    * ``"symmetric"``: the same, and ``A = A^T`` (blur): diagonal in its eigenbasis;
    * ``"general"``: anything else, applied matrix-free (conjugate gradients).
    """

    kind: str
    rows: Tensor | None = None  # (m, D) rows of a shared A
    one: Obs | None = None  # one observation, to call the channel on basis vectors
    probe: Tensor | None = None  # (D,) a random x ...
    image: Tensor | None = None  # (m,) ... and A x, to check that a later batch shares A


def _slice(obs: Obs, lo: int, hi: int) -> Obs:
    b = _batch(obs)
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v for k, v in obs.items()}


def _to(obs: Obs, device: torch.device) -> Obs:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in obs.items()}


def _probe(n: int, dev: torch.device, dt: torch.dtype, seed: int) -> Tensor:
    return torch.rand(n, generator=torch.Generator(device=dev).manual_seed(seed), device=dev, dtype=dt) + 0.5


def _on_rows(channel: Channel, one: Obs, x: Tensor, shape: tuple[int, ...], adjoint: bool) -> Tensor:
    """``A`` (or ``A^T``) applied to each row of ``x`` under the single observation ``one``."""
    out = []
    width = x.shape[1] + (_ydim(one) if not adjoint else math.prod(shape))
    step = max(1, _BUDGET // (16 * width))
    for j in range(0, x.shape[0], step):
        part = x[j : j + step]
        fn = _apply_at if adjoint else _apply_a
        out.append(fn(channel, _repeat(one, part.shape[0]), part, shape).float())
    return torch.cat(out)


def _classify(channel: Channel, obs: Obs, shape: tuple[int, ...], shared_max_dim: int) -> _Operator:
    """Probe the channel on ``obs`` (a batch of observations) to choose how to apply ``A``."""
    if _diagonal(channel, obs, shape, torch.float32) is not None:
        return _Operator("diagonal")
    b, m, d = _batch(obs), _ydim(obs), math.prod(shape)
    if max(m, d) > shared_max_dim:
        return _Operator("general")
    dev, dt = obs["y"].device, _dtype(obs)
    x, v = _probe(d, dev, dt, 2), _probe(m, dev, dt, 3)
    ax = _apply_a(channel, obs, x.expand(b, d), shape)
    atv = _apply_at(channel, obs, v.expand(b, m), shape)
    for img in (ax, atv):
        if float((img - img[:1]).abs().max()) > 1e-5 * float(img.abs().max()) + 1e-30:
            return _Operator("general")
    one = _slice(obs, 0, 1)
    rows = _on_rows(channel, one, torch.eye(m, dtype=dt, device=dev), shape, adjoint=True)
    # rows must reproduce A as well as A^T (a channel whose A and At disagree gets CG instead)
    if float((rows @ x.float() - ax[0].float()).abs().max()) > 1e-4 * float(ax.abs().max()) + 1e-30:
        return _Operator("general")
    sym = m == d and float((rows - rows.T).abs().max()) <= 1e-5 * float(rows.abs().max())
    return _Operator("symmetric" if sym else "shared", rows=rows, one=one, probe=x, image=ax[0])


def _shares(op: _Operator, channel: Channel, obs: Obs, shape: tuple[int, ...]) -> bool:
    """Whether every sample of ``obs`` has the shared ``A`` held in ``op`` (one probe)."""
    b = _batch(obs)
    if op.image is None or _ydim(obs) != op.image.numel() or obs["y"].device != op.image.device:
        return False
    ax = _apply_a(channel, obs, op.probe.expand(b, -1), shape)
    return float((ax - op.image).abs().max()) <= 1e-5 * float(op.image.abs().max()) + 1e-30


def _packed_pairs(factor: Tensor) -> tuple[Tensor, Tensor]:
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


def _woodbury(
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
    prior draw (``rz >= r`` factor normals, the first ``r`` used) and the noise. Entries with
    ``a = 0`` carry no information (their weight is 0)."""
    d, r = mean.numel(), fac.shape[1]
    x0 = mean + z[:, :d] * dvec.sqrt()
    if r:
        x0 = x0 + z[:, d : d + r] @ fac.T
    eps = z[:, d + rz :]
    den = a * a * dvec + s * s
    p = torch.where((a != 0) & (den > 0), 1.0 / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    pr = p * (y - a * x0 - s * eps)
    if r:
        prods, where = pairs if pairs is not None else _packed_pairs(fac)
        core = ((a * a * p) @ prods)[:, where].view(-1, r, r)  # F^T diag(a^2 p) F, (B or 1, r, r)
        core.diagonal(dim1=1, dim2=2).add_(1.0)
        chol, _ = torch.linalg.cholesky_ex(core)  # I + (PSD): always positive definite
        t = torch.cholesky_solve(((a * pr) @ fac)[..., None], chol)[..., 0]
        pr = pr - p * a * (t @ fac.T)
    u = a * pr
    out = x0 + dvec * u
    return out + (u @ fac) @ fac.T if r else out


class _Spectral:
    """A symmetric shared operator in its eigenbasis ``A = V diag(lam) V^T`` (float32 ``eigh``): in
    the coordinates ``w = V^T x`` a prior ``V diag(g) V^T + F F^T`` sees a diagonal ``A`` and white
    noise, so posterior samples are exact Woodbury solves with one ``r x r`` system per prior."""

    def __init__(self, basis: Tensor, lam: Tensor, s: float, jitter: float) -> None:
        self.basis, self.lam, self.s, self.jitter = basis, lam, s, jitter

    @classmethod
    def of_rows(cls, rows: Tensor, shape: tuple[int, ...], s: float, jitter: float) -> _Spectral:
        """Eigendecompose the symmetric ``A`` (its rows ``(D, D)``); when ``A`` acts on each colour
        channel of an image alike and separately, only one ``HW x HW`` block (27x cheaper at 3
        channels)."""
        d = rows.shape[0]
        c = shape[0] if len(shape) == 3 else 1
        k = d // c
        block = rows[:k, :k]
        if c > 1:
            tiled = torch.block_diag(*[block] * c)
            if float((rows - tiled).abs().max()) > 1e-6 * float(rows.abs().max()):
                block, c, k = rows, 1, d
        lam, vec = torch.linalg.eigh(0.5 * (block + block.T))
        return cls(vec.contiguous(), lam.repeat(c), s, jitter)

    @classmethod
    def of_basis(cls, basis: Tensor, op: _Operator, s: float, jitter: float) -> _Spectral | None:
        """The eigenvalues of ``A`` (``op.rows``) on a given basis (a stored prior's), or ``None``
        when that basis does not diagonalise it."""
        t = to_coords(to_coords(op.rows, basis).T.contiguous(), basis)  # V^T A V
        lam = t.diagonal().clone()
        off = float((t - torch.diag(lam)).abs().max())
        if off > 1e-3 * float(lam.abs().max()) + 1e-30:
            return None
        return cls(basis, lam, s, jitter)

    def coords(self, v: Tensor) -> Tensor:
        """``V^T v`` for rows ``v`` ``(B, D)``."""
        return to_coords(v.float(), self.basis)

    def noise(self, gamma: Tensor) -> float:
        """The noise std used: ``s``, floored at ``jitter`` times the mean of ``lam^2 g``."""
        floor = self.jitter * float((self.lam.square() * gamma).mean())
        return math.sqrt(max(self.s**2, floor))

    def sample_coords(
        self,
        mean: Tensor,
        gamma: Tensor,
        fac: Tensor,
        pairs: tuple[Tensor, Tensor] | None,
        yc: Tensor,
        z: Tensor,
        rz: int,
    ) -> Tensor:
        """Posterior samples in eigen-coordinates under ``N(mean, diag(gamma) + fac fac^T)`` (all in
        those coordinates) given ``yc = V^T y``."""
        return _woodbury(mean, gamma, fac, pairs, self.lam[None], yc, z, self.noise(gamma), rz)


class _LowRankPosterior:
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
        op: _Operator,
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
        self.spectral: _Spectral | None = None
        if prior.basis is not None:
            if op.kind == "symmetric":
                s = float(channel.noise_std(op.one))
                self.spectral = _Spectral.of_basis(prior.basis.to(dev, torch.float32), op, s, jitter)
            self.kind = (
                "spectral" if self.spectral is not None else "shared" if op.rows is not None else "general"
            )
        elif op.kind == "symmetric":
            self.kind = "shared"
        self.pairs = _packed_pairs(self.factor) if self.factor.shape[1] else None
        self.s_inv: Tensor | None = None
        self.gain: Tensor | None = None
        self.rows_done = 0
        if self.kind == "spectral":
            v = self.spectral.basis
            self.cmean = to_coords(self.mean[None], v)[0]
            self.cfac = to_coords(self.factor.T.contiguous(), v).T.contiguous()
            self.cpairs = _packed_pairs(self.cfac) if self.cfac.shape[1] else None
        if self.kind == "shared":
            self._factor_shared()

    def _factor_shared(self) -> None:
        """``S^-1`` for the shared ``S = A Sigma A^T + s^2 I`` (float32 Cholesky; ``jitter`` relative
        to the mean of ``diag(S)`` sets a floor under ``s^2``, raised x10 on failure)."""
        op = self.op
        self.sig_at = self.prior.matvec(op.rows)  # (m, D): row k is Sigma A^T e_k
        m = op.rows.shape[0]
        s_mat = _on_rows(self.channel, op.one, self.sig_at, self.shape, adjoint=False)
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
        y = _flat_y(obs).float()
        if self.kind == "diagonal":
            a = diag_a if diag_a is not None else _diagonal(self.channel, obs, self.shape, torch.float32)
            if a is not None:
                rz = self.prior.factor.shape[1]
                return _woodbury(self.mean, self.diag, self.factor, self.pairs, a, y, z, s, rz)
        elif self.kind == "spectral" and _shares(self.op, self.channel, obs, self.shape):
            sp = self.spectral
            rz = self.prior.factor.shape[1]
            w = sp.sample_coords(self.cmean, self.diag, self.cfac, self.cpairs, sp.coords(y), z, rz)
            return from_coords(w, sp.basis)
        elif self.kind == "shared" and _shares(self.op, self.channel, obs, self.shape):
            return self._shared(obs, y, z, s)
        return _cg_sample(
            self.prior, self.channel, obs, self.shape, z, self.cg_iters, self.cg_tol, max(self.jitter, 1e-6)
        ).float()

    def _shared(self, obs: Obs, y: Tensor, z: Tensor, s: float) -> Tensor:
        """``x0 + (S^-1 r)^T (A Sigma)`` with the shared ``S^-1``; once more rows than ``m`` went
        through, the gain ``S^-1 A Sigma`` is formed so that each further batch is one product."""
        x0 = self.prior.draw(z[:, : self.prior.noise_dim])
        res = y - _apply_a(self.channel, obs, x0, self.shape).float() - s * z[:, self.prior.noise_dim :]
        self.rows_done += x0.shape[0]
        if self.gain is None and self.rows_done > self.s_inv.shape[0]:
            self.gain = self.s_inv @ self.sig_at
        if self.gain is not None:
            return x0 + res @ self.gain
        return x0 + (res @ self.s_inv) @ self.sig_at


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
        if prior.basis is not None:
            return prior.to(dev).matvec(u) if prior.mean.device != dev else prior.matvec(u)
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


_METHODS = ("auto", "dense", "diagonal", "spectral", "shared", "cg")


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
    shared_max_dim: int = 4096,
) -> Tensor:
    """Posterior samples ``(B, *shape)`` (obs dtype, obs device) from standard normals ``z``
    ``(B, noise_dim + m)``; ``prior`` must be on the observations' device."""
    _check_linear(channel)
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r} ({', '.join(_METHODS)})")
    if method == "auto":
        method = "dense" if prior.full else "lowrank"
    b, m, d = _batch(obs), _ydim(obs), math.prod(shape)
    if prior.dim != d:
        raise DiffemError(f"Gaussian prior has dimension {prior.dim}, data {shape} has {d}")
    dev, nd = obs["y"].device, prior.noise_dim
    out = []
    if method == "dense":
        cov = prior.covariance()
        start = 0
        for part in _chunks(obs, 8 * 3 * m * d):
            n = _batch(part)
            zz = z[start : start + n].to(dev, _F64)
            start += n
            x0 = prior.draw(zz[:, :nd])
            rw = _rows(channel, part, shape)
            r = rw.y - rw.apply(x0) - rw.take(rw.s * zz[:, nd:])
            _, _, sr, a_cov = _solve(rw, cov, r, jitter)
            out.append(x0 + rw.gain(cov, sr, a_cov))
        return torch.cat(out).to(_dtype(obs)).view(b, *shape)
    if prior.full:
        raise ValueError(f"method {method!r} needs a low-rank-plus-diagonal prior")
    op = _Operator("general") if method == "cg" else _classify(channel, obs, shape, shared_max_dim)
    if method == "shared" and op.kind == "symmetric":
        op = replace(op, kind="shared")
    post = _LowRankPosterior(prior, channel, shape, op, jitter=jitter, cg_iters=cg_iters, cg_tol=cg_tol)
    if method not in ("lowrank", "cg") and post.kind != method:
        raise ValueError(f"method {method!r}: channel {channel.name!r} with this prior needs {post.kind!r}")
    return _lowrank_pass(post, obs, z, m).to(_dtype(obs)).view(b, *shape)


def _lowrank_pass(
    post: _LowRankPosterior, obs: Obs, z: Tensor, m: int, diag_a: Tensor | None = None
) -> Tensor:
    """``post.sample`` over ``obs`` in sub-batches that fit the memory budget (``diag_a``: the
    observations' ``diag(A)``, when known)."""
    d, r = post.mean.numel(), post.prior.factor.shape[1]
    per = 4 * (m * (r + 8) + 8 * d) if post.kind == "general" else 4 * (8 * (d + m) + r * (r + 2))
    out, start = [], 0
    for part in _chunks(obs, per):
        n = _batch(part)
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
    z = torch.randn(_batch(obs), prior.noise_dim + _ydim(obs), generator=generator, device=gdev)
    pr = prior.to(dev)
    jit = _jit(method, pr, jitter)
    return _sample_from_noise(
        pr, channel, _to(obs, dev), shape, z.to(dev), method, cg_iters, cg_tol, jit
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
    z = torch.zeros(_batch(obs), prior.noise_dim + _ydim(obs), device=dev)
    pr = prior.to(dev)
    jit = _jit(method, pr, jitter)
    return _sample_from_noise(pr, channel, _to(obs, dev), shape, z, method, cg_iters, cg_tol, jit).cpu()


def _jit(method: str, prior: GaussianPrior, jitter: float | None) -> float:
    """Default jitter: 1e-8 (dense, float64), 1e-6 (CG), 1e-5 (float32 factorisations: a floor under
    ``s^2`` only), each relative to the mean of ``diag(A Sigma A^T)``."""
    if jitter is not None:
        return jitter
    if method == "dense" or (method == "auto" and prior.full):
        return 1e-8
    return 1e-6 if method == "cg" else 1e-5


def _reuse(
    prior: GaussianPrior, channel: Channel, shape: tuple[int, ...], dev: torch.device
) -> _Operator | None:
    """The operator ``fit_gaussian`` probed for this channel and shape, moved to ``dev``, if any."""
    if prior._probed is None or prior._probed[0] is not channel or tuple(prior._probed[1]) != tuple(shape):
        return None
    op = prior._probed[2]

    def move(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dev)

    one = None if op.one is None else _to(op.one, dev)
    return _Operator(op.kind, rows=move(op.rows), one=one, probe=move(op.probe), image=move(op.image))


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
    matrix-free path). ``device`` runs the linear algebra there (batches are moved to it).
    """
    _check_linear(channel)
    shape = tuple(shape)
    batches = obs_batches() if callable(obs_batches) else obs_batches
    start = 0
    post: _LowRankPosterior | None = None
    pr: GaussianPrior | None = None
    for obs in batches:
        b = _batch(obs)
        dev = torch.device(device) if device is not None else obs["y"].device
        obs = _to(obs, dev)
        if pr is None:
            pr = prior.to(dev)
        seeds = sample_seeds(seed, range(start, start + b), START_TAG)
        z = per_sample(seeds, (prior.noise_dim + _ydim(obs),)).to(dev)
        start += b
        if pr.full:
            with _one_thread(dev):
                x = _sample_from_noise(
                    pr, channel, obs, shape, z, "dense", cg_iters, cg_tol, _jit("dense", pr, None)
                )
        else:
            if post is None:
                op = _reuse(prior, channel, shape, dev)
                if op is None or (op.kind != "diagonal" and not _shares(op, channel, obs, shape)):
                    op = _classify(channel, obs, shape, shared_max_dim)
                post = _LowRankPosterior(
                    pr, channel, shape, op, jitter=1e-5, cg_iters=cg_iters, cg_tol=cg_tol
                )
            x = _lowrank_pass(post, obs, z, _ydim(obs)).to(_dtype(obs)).view(b, *shape)
        yield x.cpu()


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
    factor = (basis @ vecs[:, -r:].flip(1)) * vals[-r:].flip(0).clamp_min(0).sqrt()
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(d, rank - r)], 1)
    floor = 1e-3 * float(var.mean().clamp_min(1e-12))
    diag = (var - factor.square().sum(1)).clamp_min(floor)
    return mean, diag, factor


def _subset(obs_batches: ObsBatches, n_total: int, max_fit: int, device: torch.device) -> Obs:
    """An evenly strided subset of at most ``max_fit`` observations, gathered on ``device``."""
    stride = max(1, -(-n_total // max_fit))
    parts: list[Obs] = []
    start = 0
    for obs in obs_batches():
        b = _batch(obs)
        first = (-start) % stride
        if first < b:
            sel = torch.arange(first, b, stride)
            parts.append(
                {
                    k: v[sel.to(v.device)] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
                    for k, v in obs.items()
                }
            )
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
    op: _Operator,
    iters: int,
    rank: int,
    generator: torch.Generator,
    progress: ProgressFn | None,
    *,
    cg_iters: int,
    cg_tol: float,
) -> GaussianPrior:
    """Stochastic EM on ``obs`` (one batch, on the working device) in pixel coordinates: each
    iteration draws one posterior sample per observation under the current prior and refits the
    prior to them."""
    n, m = _batch(obs), _ydim(obs)
    # A does not change across iterations: read a diagonal operator off the channel once
    diag_a = _diagonal(channel, obs, shape, torch.float32) if op.kind == "diagonal" else None
    for i in range(iters):
        post = _LowRankPosterior(prior, channel, shape, op, jitter=1e-5, cg_iters=cg_iters, cg_tol=cg_tol)
        z = torch.randn(n, prior.noise_dim + m, generator=generator, device=generator.device)
        x = _lowrank_pass(post, obs, z.to(prior.mean.device), m, diag_a)
        warm = bool(prior.factor.any())
        mean, diag, factor = ppca(x, rank, prior.factor, generator, niter=2 if warm else 4)
        prior = GaussianPrior(mean=mean, diag=diag, factor=factor)
        if progress is not None:
            progress(i + 1, iters, {"var": float(x.var(0).mean())})
    return prior


def _em_spectral(
    prior: GaussianPrior,
    channel: Channel,
    obs: Obs,
    shape: tuple[int, ...],
    op: _Operator,
    iters: int,
    rank: int,
    generator: torch.Generator,
    progress: ProgressFn | None,
) -> GaussianPrior:
    """Stochastic EM for a symmetric ``A`` shared by all samples, entirely in its eigen-coordinates
    ``w = V^T x``: there ``A`` is diagonal and the residual covariance ``diag(g)`` is a spectrum
    (a stationary-like prior for blur), so each iteration costs ``O(n D r)``. The prior comes back
    as ``V diag(g) V^T + F F^T`` with ``basis = V``."""
    sp = _Spectral.of_rows(op.rows, shape, float(channel.noise_std(op.one)), 1e-5)
    v = sp.basis
    yc = torch.cat([sp.coords(_flat_y(part)) for part in _chunks(obs, 64 * _ydim(obs))])
    n, d = yc.shape
    k = v.shape[0]
    mean = to_coords(prior.mean.float()[None], v)[0]
    gamma = (prior.diag.float().view(-1, k) @ v.square()).flatten().clamp_min(0)  # diag of V^T D V
    fac = to_coords(prior.factor.float().T.contiguous(), v).T.contiguous()
    r = fac.shape[1]
    for i in range(iters):
        live = fac if bool(fac.any()) else fac[:, :0]
        pairs = _packed_pairs(live) if live.shape[1] else None
        z = torch.randn(n, d + r + d, generator=generator, device=generator.device).to(yc.device)
        w = torch.cat(
            [
                sp.sample_coords(mean, gamma, live, pairs, yc[j : j + 4096], z[j : j + 4096], r)
                for j in range(0, n, 4096)
            ]
        )
        mean, gamma, fac = ppca(w, rank, fac, generator, niter=2 if bool(fac.any()) else 4)
        if progress is not None:
            progress(i + 1, iters, {"var": float(w.var(0).mean())})
    return GaussianPrior(
        mean=from_coords(mean[None], v)[0],
        diag=gamma,
        factor=from_coords(fac.T.contiguous(), v).T.contiguous(),
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
) -> GaussianPrior:
    """Fit ``N(mu, Sigma)`` to observations of a linear channel by ``iters`` EM iterations; the
    prior comes back on the CPU.

    ``obs_batches()`` returns a fresh iterable of observation dicts each call. Up to
    ``full_max_dim`` dimensions the covariance is full and EM exact (float64, every observation,
    one pass per iteration). Beyond, ``Sigma`` is ``rank`` factors plus a diagonal (in pixel
    coordinates, or, for a symmetric ``A`` shared by all samples such as blur, in ``A``'s
    eigenbasis, stored as ``basis``), fitted by stochastic EM on an evenly strided subset of at
    most ``max_fit`` observations held on the device: posterior samples (normals from
    ``generator``, default seed 0), then the mean and a top-``rank`` PCA of the samples.
    ``progress(i, iters, stats)`` is called after each iteration; ``stats`` holds ``loglik``
    (exact EM: mean log-likelihood per observation under the prior before the step) or ``var``
    (stochastic EM: mean per-dimension variance of the samples). ``device`` runs the linear
    algebra there (default: the observations' device); ``init`` restarts from a prior.
    """
    _check_linear(channel)
    shape = tuple(shape)
    full = math.prod(shape) <= full_max_dim
    first = next(iter(obs_batches()), None)
    if first is None:
        raise DiffemError("no observations to fit the Gaussian start to")
    dev = torch.device(device) if device is not None else first["y"].device
    if full:

        def moved() -> Iterator[Obs]:
            return (_to(o, dev) for o in obs_batches())

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
    n_total = sum(_batch(o) for o in obs_batches())
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
    op = _classify(channel, obs, shape, shared_max_dim)
    if op.kind == "symmetric":
        prior = _em_spectral(prior, channel, obs, shape, op, iters, rank, generator, progress)
    else:
        prior = _em_lowrank(
            prior, channel, obs, shape, op, iters, rank, generator, progress, cg_iters=cg_iters, cg_tol=cg_tol
        )
    out = prior.to("cpu")
    out._probed = (channel, shape, op)  # gaussian_start reuses the probed operator (checked per batch)
    return out
