"""How a channel's linear operator ``A`` is applied, classified and materialised for the Gaussian
start, working on flattened data ``(B, D)`` and observations ``(B, m)``.

A channel offers ``A``, ``A^T`` and its noise level ``s``; these helpers apply them to flattened
rows, read ``A`` off the channel (:func:`operator_matrix`, :func:`diagonal_of`, the informative
:class:`Rows` the exact path solves on) and probe it once (:func:`classify`) to pick the cheapest
exact posterior: ``diagonal`` (masks, noise), ``shared`` (one ``A`` for every sample, held as its
rows), ``symmetric`` (shared and ``A = A^T``: :class:`Spectral`, diagonal in its eigenbasis, as for
blur) or ``general`` (matrix-free).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from diffem_channels.base import Channel
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.linalg import to_coords, woodbury_sample

Obs = Mapping[str, Tensor]

_BUDGET = 2**28  # bytes of working memory per internal sub-batch
_F64 = torch.float64


def check_linear(channel: Channel) -> None:
    """Refuse a channel without a linear form (it offers no ``A``) with a one-line error."""
    if not getattr(channel, "linear", False):
        raise DiffemError(
            f"channel {channel.name!r} has no linear form, so it has no Gaussian start; use --warm-start"
        )


def batch_size(obs: Obs) -> int:
    """Number of observations in the batch."""
    return int(obs["y"].shape[0])


def y_dim(obs: Obs) -> int:
    """Flattened observation dimension ``m``."""
    return math.prod(obs["y"].shape[1:])


def obs_dtype(obs: Obs) -> torch.dtype:
    """The floating dtype the channel is called in: ``y``'s, or float32 for integer ``y``."""
    y = obs["y"]
    return y.dtype if y.is_floating_point() else torch.float32


def flat_y(obs: Obs) -> Tensor:
    """The observations ``y`` flattened to ``(B, m)``."""
    return obs["y"].reshape(batch_size(obs), -1)


def obs_to(obs: Obs, device: torch.device) -> Obs:
    """The observation batch with its tensors on ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in obs.items()}


def _slice(obs: Obs, lo: int, hi: int) -> Obs:
    b = batch_size(obs)
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v for k, v in obs.items()}


def _repeat(obs: Obs, times: int) -> Obs:
    """Each sample's observation repeated ``times`` times in a row (batch ``B * times``)."""
    b = batch_size(obs)
    return {
        k: v.repeat_interleave(times, 0) if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
        for k, v in obs.items()
    }


def chunks(obs: Obs, per_sample_bytes: int) -> Iterator[Obs]:
    """Split a batch of observations into sub-batches whose working memory fits the budget."""
    b = batch_size(obs)
    step = max(1, _BUDGET // max(per_sample_bytes, 1))
    if step >= b:
        yield obs
        return
    for i in range(0, b, step):
        yield {
            k: v[i : i + step] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
            for k, v in obs.items()
        }


def apply_a(channel: Channel, obs: Obs, x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``A x`` for flattened ``x`` ``(B, D)``, flattened to ``(B, m)``."""
    b = x.shape[0]
    out = channel.A(obs, x.to(obs_dtype(obs)).reshape(b, *shape))
    if out.numel() != b * y_dim(obs):
        raise DiffemError(f"channel {channel.name!r}: A(x) has shape {tuple(out.shape)}, unlike y")
    return out.reshape(b, -1)


def apply_at(channel: Channel, obs: Obs, v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``A^T v`` for flattened ``v`` ``(B, m)``, flattened to ``(B, D)``."""
    b = v.shape[0]
    out = channel.At(obs, v.to(obs_dtype(obs)).reshape(obs["y"].shape))
    if out.numel() != b * math.prod(shape):
        raise DiffemError(f"channel {channel.name!r}: At(y) has shape {tuple(out.shape)}, not data {shape}")
    return out.reshape(b, -1)


def on_rows(channel: Channel, one: Obs, x: Tensor, shape: tuple[int, ...], adjoint: bool) -> Tensor:
    """``A`` (or ``A^T``) applied to each row of ``x`` under the single observation ``one``."""
    out = []
    width = x.shape[1] + (y_dim(one) if not adjoint else math.prod(shape))
    step = max(1, _BUDGET // (16 * width))
    for j in range(0, x.shape[0], step):
        part = x[j : j + step]
        fn = apply_at if adjoint else apply_a
        out.append(fn(channel, _repeat(one, part.shape[0]), part, shape).float())
    return torch.cat(out)


def operator_matrix(channel: Channel, obs: Obs, shape: tuple[int, ...]) -> Tensor:
    """Each sample's ``A`` as a float64 ``(B, m, D)`` tensor, by applying the channel to basis
    vectors: of the ``y`` space through ``A^T`` when ``m < D``, else of the data space through
    ``A``; several basis vectors per call, on the observations repeated, to keep calls few."""
    check_linear(channel)
    b, m, d = batch_size(obs), y_dim(obs), math.prod(shape)
    dev, dt = obs["y"].device, obs_dtype(obs)
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
            out[:, j : j + c, :] = apply_at(channel, rep, x, shape).view(b, c, d)
        else:
            out[:, :, j : j + c] = apply_a(channel, rep, x, shape).view(b, c, m).transpose(1, 2)
    return out


def diagonal_of(
    channel: Channel, obs: Obs, shape: tuple[int, ...], dtype: torch.dtype = _F64
) -> Tensor | None:
    """``diag(A)`` ``(B, D)`` in ``dtype`` when ``A`` is diagonal (masks, noise), tested on a random
    probe through both ``A`` and ``A^T``; ``None`` otherwise. Saves materialising ``A``."""
    b, d = batch_size(obs), math.prod(shape)
    if y_dim(obs) != d:
        return None
    dev, dt = obs["y"].device, obs_dtype(obs)
    gen = torch.Generator(device=dev).manual_seed(1)
    z = torch.rand(b, d, generator=gen, device=dev, dtype=dt) + 0.5
    diag = apply_a(channel, obs, torch.ones(b, d, dtype=dt, device=dev), shape)
    tol = 1e-5 * float(diag.abs().max()) + 1e-30
    for image in (apply_a(channel, obs, z, shape), apply_at(channel, obs, z, shape)):
        if float((image - diag * z).abs().max()) > tol:
            return None
    return diag.to(dtype)


@dataclass
class Rows:
    """The informative rows of each sample's ``A``: all non-zero rows, padded with zero rows to the
    batch's largest count ``k`` (independent of the prior, so the exact EM fit holds them across
    its iterations).

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

    def subset(self, sel: Tensor, k: int) -> Rows:
        """Samples ``sel``, first ``k`` rows."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sel, :k]

        return Rows(
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
        """Memory the rows hold, in bytes."""
        parts = (self.y, self.valid, self.rows, self.a, self.idx, self.coef)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def informative_rows(channel: Channel, obs: Obs, shape: tuple[int, ...]) -> Rows:
    """Each sample's informative rows of ``A`` (from its diagonal, or materialised)."""
    s = float(channel.noise_std(obs))
    y = flat_y(obs).to(_F64)
    diag = diagonal_of(channel, obs, shape)
    if diag is not None:
        nz = diag != 0
        k = max(int(nz.sum(1).max()) if nz.numel() else 1, 1)
        rows = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = nz.gather(1, rows).to(_F64)
        rw = Rows(y=y.gather(1, rows) * valid, valid=valid, rows=rows, s=s)
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
    rw = Rows(y=y * valid, valid=valid, rows=rows, s=s)
    if bool((nnz <= 1).all()):
        rw.idx = a.abs().argmax(-1)
        rw.coef = a.gather(2, rw.idx[..., None])[..., 0]
    else:
        rw.a = a
    return rw


def by_count(rw: Rows, groups: int = 8) -> Iterator[Rows]:
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


@dataclass(eq=False)
class Operator:
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

    def to(self, device: torch.device) -> Operator:
        """This operator with its tensors on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        one = None if self.one is None else obs_to(self.one, device)
        return Operator(
            self.kind, rows=move(self.rows), one=one, probe=move(self.probe), image=move(self.image)
        )


@dataclass(frozen=True, eq=False)
class Probed:
    """An :class:`Operator` with the channel and data shape it was probed on: what a fit learnt
    about its channel, handed on explicitly (``GaussianPrior.probed``) so that sampling with the
    same channel need not probe again."""

    channel: Channel
    shape: tuple[int, ...]
    operator: Operator

    def operator_for(self, channel: Channel, shape: tuple[int, ...], device: torch.device) -> Operator | None:
        """The operator on ``device`` when ``channel`` (the same object) and ``shape`` are those it was
        probed on, else ``None``; whether a batch shares a held ``A`` is still the caller's check."""
        if channel is not self.channel or tuple(shape) != tuple(self.shape):
            return None
        return self.operator.to(device)


def _probe(n: int, dev: torch.device, dt: torch.dtype, seed: int) -> Tensor:
    return torch.rand(n, generator=torch.Generator(device=dev).manual_seed(seed), device=dev, dtype=dt) + 0.5


def classify(channel: Channel, obs: Obs, shape: tuple[int, ...], shared_max_dim: int) -> Operator:
    """Probe the channel on ``obs`` (a batch of observations) to choose how to apply ``A``."""
    if diagonal_of(channel, obs, shape, torch.float32) is not None:
        return Operator("diagonal")
    b, m, d = batch_size(obs), y_dim(obs), math.prod(shape)
    if max(m, d) > shared_max_dim:
        return Operator("general")
    dev, dt = obs["y"].device, obs_dtype(obs)
    x, v = _probe(d, dev, dt, 2), _probe(m, dev, dt, 3)
    ax = apply_a(channel, obs, x.expand(b, d), shape)
    atv = apply_at(channel, obs, v.expand(b, m), shape)
    for img in (ax, atv):
        if float((img - img[:1]).abs().max()) > 1e-5 * float(img.abs().max()) + 1e-30:
            return Operator("general")
    one = _slice(obs, 0, 1)
    rows = on_rows(channel, one, torch.eye(m, dtype=dt, device=dev), shape, adjoint=True)
    # rows must reproduce A as well as A^T (a channel whose A and At disagree gets CG instead)
    if float((rows @ x.float() - ax[0].float()).abs().max()) > 1e-4 * float(ax.abs().max()) + 1e-30:
        return Operator("general")
    sym = m == d and float((rows - rows.T).abs().max()) <= 1e-5 * float(rows.abs().max())
    return Operator("symmetric" if sym else "shared", rows=rows, one=one, probe=x, image=ax[0])


def shares(op: Operator, channel: Channel, obs: Obs, shape: tuple[int, ...]) -> bool:
    """Whether every sample of ``obs`` has the shared ``A`` held in ``op`` (one probe)."""
    b = batch_size(obs)
    if op.image is None or y_dim(obs) != op.image.numel() or obs["y"].device != op.image.device:
        return False
    ax = apply_a(channel, obs, op.probe.expand(b, -1), shape)
    return float((ax - op.image).abs().max()) <= 1e-5 * float(op.image.abs().max()) + 1e-30


class Spectral:
    """A symmetric shared operator in its eigenbasis ``A = V diag(lam) V^T`` (float32 ``eigh``): in
    the coordinates ``w = V^T x`` a prior ``V diag(g) V^T + F F^T`` sees a diagonal ``A`` and white
    noise, so posterior samples are exact Woodbury solves with one ``r x r`` system per prior."""

    def __init__(self, basis: Tensor, lam: Tensor, s: float, jitter: float) -> None:
        self.basis, self.lam, self.s, self.jitter = basis, lam, s, jitter

    @classmethod
    def of_rows(cls, rows: Tensor, shape: tuple[int, ...], s: float, jitter: float) -> Spectral:
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
    def of_basis(cls, basis: Tensor, op: Operator, s: float, jitter: float) -> Spectral | None:
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
        return woodbury_sample(mean, gamma, fac, pairs, self.lam[None], yc, z, self.noise(gamma), rz)
