"""Sinkhorn divergence of the manifold benchmark, computed fast but iterate for iterate as POT does.

The benchmark's score (see the README) is POT's ``ot.sinkhorn2(a, b, M, reg, method="sinkhorn_log")``
with uniform weights, squared Euclidean cost, ``reg = 1e-3`` and at most 1,024 iterations (stopping
early when the marginal error, checked every 10 iterations, falls below 1e-9), between the samples
and one half of the reference, minus the same between the two halves of the reference.

With ``reg = 1e-3`` and costs up to ~80 the Gibbs kernel ``exp(-M / reg)`` underflows, so POT must
run in the log domain, and it rarely converges in 1,024 iterations: the score is the value of the
1,024th iterate, so an implementation must reproduce POT's iterates, not just some solution.
POT's dense ``logsumexp`` iterations take about a minute for 1,024 points and, extrapolated,
~20 minutes for 4,096 on a 2-core CPU (~12 with its torch backend; bench/results/metrics.md).

``sinkhorn_cost`` runs the same updates (``v = log b - LSE_i(-M/reg + u)``, ``u = log a -
LSE_j(-M/reg + v)``, POT's stopping rule) in float64, but evaluates each log-sum-exp on a sparse
support. With reg = 1e-3 a row's terms ``-M_ij/reg + v_j`` span tens of thousands of nats, and
only those within a few hundred of the row's largest matter, so for each row the kernel keeps the
entries within ``HOT = 150`` nats of its largest term and the log-sum-exp becomes a sparse
matrix-vector product ``K @ exp(v - v0)`` with ``K = exp(-M/reg + v0 - rowmax)`` fixed, valid
while the drift ``v - v0`` spreads over less than ``HOT - PRECISION`` nats: every dropped term
then stays more than ``PRECISION = 50`` nats (a factor 2e-22) below the row's largest, so the
result agrees with POT to rounding (1e-13 relative or better in bench/results/metrics.md;
tests/metrics/test_metrics.py checks 1e-9). When the drift grows, the hot kernel is re-picked
from a *wide* set (entries within ``WIDE = 600`` nats, found by one dense pass over the cost matrix in float32
blocks with a safety margin, kept values recomputed in float64), and the wide set itself is
re-selected only once the drift since its selection could hide a needed entry. Rows (u-update)
and columns (v-update) keep separate kernels, each refreshed only when the potential it depends
on has moved. Cost: two sparse products per iteration (~1M entries at 4,096 points on the curve,
in torch's CSR layout, which spreads rows over torch's threads; identical bits at 1 and 2 threads
on the AMD EPYC it was measured on, though its vectorised sums may order terms differently on
another CPU or thread count, a difference at rounding level) plus a few dense passes (timings:
bench/results/metrics.md). Supports are sparse only because reg is small relative to the spread of
the costs: for large reg or tiny clouds they fill up and the method degrades gracefully to dense
products.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict

import numpy as np
import torch

from diffem_cli.core.errors import DiffemError

REG = 1e-3
MAX_ITER = 1024
STOP_THR = 1e-9
BOUND = 3.0
FLOOR = 1e-6
N_POINTS = 4096

PRECISION = 50.0  # nats: entries this far below a row's largest term are dropped (e^-50 ~ 2e-22)
HOT = 150.0  # nats kept in the kernel used by the iterations
WIDE = 600.0  # nats kept in the wide set the hot kernel is re-picked from
_CHUNK_ENTRIES = 1 << 22  # entries per float32 block of the dense support selection


def _points(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = (
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    )
    if arr.ndim != 2:
        raise DiffemError(f"{name} must be a (points, dimensions) array, got shape {tuple(arr.shape)}")
    if len(arr) == 0:
        raise DiffemError(f"{name} holds no points")
    if not np.isfinite(arr).all():
        raise DiffemError(f"{name} holds NaN or infinite values")
    return np.ascontiguousarray(arr)


class _LogKernel:
    """``LSE_j(-M_ij / reg + w_j)`` for every row ``i`` of ``q`` (``M``: squared distances to ``p``).

    Two tiers: a *wide* set of entries (within ``WIDE`` nats of each row's largest term at ``w``
    when selected, found by a dense pass) and a *hot* sparse kernel (within ``HOT`` nats, picked
    from the wide set) used in the matrix-vector products. ``lse(w)`` is exact to ``PRECISION``
    nats while ``fresh(w)``; ``update(w)`` re-picks the hot kernel from the wide set (cheap) while
    the wide set still covers it, else selects a new wide set.
    """

    def __init__(self, q: np.ndarray, p: np.ndarray, w: np.ndarray, reg: float) -> None:
        self.q, self.p, self.reg = q, p, reg
        self.wide_nats, self.hot_nats = WIDE, HOT
        self._select_wide(w)

    def _select_wide(self, w: np.ndarray) -> None:
        self.wide_rows = self.wide_cols = self.wide_logk = self.k = None  # free before reselecting
        rows, cols = _select(self.q, self.p, w, self.reg, self.wide_nats)
        self.wide_w0 = w.copy()
        self.wide_rows, self.wide_cols = rows, cols
        self.wide_logk = _sq_dists(self.q, self.p, rows, cols)
        self.wide_logk *= -1.0 / self.reg
        self.wide_logk += torch.from_numpy(w)[cols]
        self._pick_hot(w)

    def _pick_hot(self, w: np.ndarray) -> None:
        n = len(self.q)
        logk = self.wide_logk + torch.from_numpy(w - self.wide_w0)[self.wide_cols]
        top = torch.full((n,), -math.inf, dtype=torch.float64)
        top.scatter_reduce_(0, self.wide_rows, logk, "amax")  # every row holds its largest term
        logk -= top[self.wide_rows]
        keep = logk >= -self.hot_nats
        indptr = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(self.wide_rows[keep], minlength=n), 0, out=indptr[1:])
        # torch's CSR product runs on every thread (scipy's on one), twice as fast again with
        # 32-bit indices; each row is still one sum
        index = torch.int32 if int(indptr[-1]) < torch.iinfo(torch.int32).max else torch.int64
        with warnings.catch_warnings():  # torch calls its sparse CSR layout beta, once per process
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            self.k = torch.sparse_csr_tensor(
                indptr.to(index),
                self.wide_cols[keep].to(index),
                logk[keep].exp_(),
                size=(n, len(self.p)),
                check_invariants=False,
            )
        self.max, self.w0 = top.numpy(), w.copy()

    def fresh(self, w: np.ndarray) -> bool:
        return _spread(w - self.w0) <= self.hot_nats - PRECISION

    def update(self, w: np.ndarray) -> None:
        if _spread(w - self.wide_w0) <= self.wide_nats - self.hot_nats:
            self._pick_hot(w)
        else:
            self._select_wide(w)

    def lse(self, w: np.ndarray) -> np.ndarray:
        if not self.fresh(w):
            self.update(w)
        d = w - self.w0
        top = d.max()
        return self.max + top + np.log((self.k @ torch.from_numpy(np.exp(d - top))).numpy())

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row, column and value of every kernel entry."""
        counts = self.k.crow_indices().diff().long()
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return rows, self.k.col_indices().long(), self.k.values()


def _sq_dists(q: np.ndarray, p: np.ndarray, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``|q_rows - p_cols|^2`` entry by entry, one coordinate at a time (a fixed order of the
    sum)."""
    qt, pt = torch.from_numpy(q.T.copy()), torch.from_numpy(p.T.copy())
    out = torch.zeros(len(rows), dtype=torch.float64)
    for qd, pd in zip(qt, pt, strict=True):
        out += (qd.index_select(0, rows) - pd.index_select(0, cols)).square_()
    return out


def _spread(d: np.ndarray) -> float:
    return float(d.max() - d.min())


def _select(
    q: np.ndarray, p: np.ndarray, w: np.ndarray, reg: float, nats: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (i, j), grouped by i, with ``-M_ij/reg + w_j`` within ``nats`` of row i's maximum.

    One dense pass in float32 blocks (``S_ij = (2 q_i.p_j - |p_j|^2) / reg + w_j``, the row-constant
    ``-|q_i|^2 / reg`` left out) with a margin covering float32 rounding, so the set is a superset.
    """
    w = w - w.max()
    p2 = (p * p).sum(1)
    qa = torch.from_numpy(np.c_[q * (2.0 / reg), np.ones(len(q))]).float()
    pa_np = np.c_[p, w - p2 / reg]
    pa = torch.from_numpy(pa_np).float().T.contiguous()
    scale = 2.0 * np.abs(q).sum(1).max() * np.abs(p).max() / reg + np.abs(pa_np[:, -1]).max()
    margin = 1.0 + 4.0 * (q.shape[1] + 2) * 6e-8 * scale
    chunk = max(1, _CHUNK_ENTRIES // len(p))
    rows, cols = [], []
    for s in range(0, len(q), chunk):
        block = qa[s : s + chunk] @ pa
        block -= block.amax(1, keepdim=True) - (nats + margin)
        r, c = (block >= 0).nonzero(as_tuple=True)
        rows.append(r + s)
        cols.append(c)
    return torch.cat(rows), torch.cat(cols)


def sinkhorn_cost(
    a_pts: torch.Tensor | np.ndarray,
    b_pts: torch.Tensor | np.ndarray,
    reg: float = REG,
    max_iter: int = MAX_ITER,
    stop_thr: float = STOP_THR,
) -> float:
    """``ot.sinkhorn2(a, b, ot.dist(a_pts, b_pts), reg, method="sinkhorn_log", numItermax=max_iter)``.

    Uniform weights, squared Euclidean cost (not normalised): the transport cost ``<M, P>`` of the
    plan after POT's iterations, with POT's stopping rule (marginal error ``< stop_thr``, checked
    every 10 iterations). Runs in float64 on the CPU; see the module docstring for how.
    """
    x, y = _points(a_pts, "first point set"), _points(b_pts, "second point set")
    if x.shape[1] != y.shape[1]:
        raise DiffemError(f"point sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    if not reg > 0:
        raise DiffemError(f"entropic regularisation must be positive, got {reg}")
    centre = np.concatenate([x, y]).mean(0)
    x, y = x - centre, y - centre
    n, m = len(x), len(y)
    log_a, log_b = -math.log(n), -math.log(m)
    b = np.full(m, 1.0 / m)
    u, v = np.zeros(n), np.zeros(m)
    cols = _LogKernel(y, x, u, reg)  # column sums: LSE_i(-M_ij / reg + u_i)
    rows = _LogKernel(x, y, v, reg)  # row sums: LSE_j(-M_ij / reg + v_j)
    for it in range(max_iter):
        v = log_b - cols.lse(u)
        u = log_a - rows.lse(v)
        if it % 10 == 0:
            err = np.linalg.norm(np.exp(v + cols.lse(u)) - b)
            if err < stop_thr:
                break
    if not rows.fresh(v):
        rows.update(v)
    i, j, k = rows.entries()
    u_t, v_t, top = torch.from_numpy(u), torch.from_numpy(v - rows.w0), torch.from_numpy(rows.max)
    plan = k * (top[i] + u_t[i] + v_t[j]).exp()
    return float((_sq_dists(x, y, i, j) * plan).sum())


def in_box(x: torch.Tensor, bound: float = BOUND) -> torch.Tensor:
    """The rows of ``x`` with every coordinate strictly inside ``(-bound, bound)``."""
    return x[(x.abs() < bound).all(1)]


_REF_CACHE: OrderedDict[str, float] = OrderedDict()
_REF_CACHE_SIZE = 16


def _reference_term(ref_a: torch.Tensor, ref_b: torch.Tensor, reg: float, max_iter: int) -> float:
    h = hashlib.sha256()
    for t in (ref_a, ref_b):
        arr = t.detach().cpu().double().numpy()
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    key = f"{h.hexdigest()}:{reg!r}:{max_iter}"
    if key in _REF_CACHE:
        _REF_CACHE.move_to_end(key)
        return _REF_CACHE[key]
    value = sinkhorn_cost(ref_a, ref_b, reg=reg, max_iter=max_iter)
    _REF_CACHE[key] = value
    while len(_REF_CACHE) > _REF_CACHE_SIZE:
        _REF_CACHE.popitem(last=False)
    return value


def sinkhorn_divergence(
    samples: torch.Tensor,
    reference: torch.Tensor,
    n_points: int = N_POINTS,
    reg: float = REG,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> float:
    """The manifold benchmark's score: ``sinkhorn2(samples, ref_A) - sinkhorn2(ref_A, ref_B)``, >= 1e-6.

    Rows with any coordinate outside (-3, 3) are dropped from both sets first; samples none of
    which lie inside score ``inf`` (a sampler that diverged, reported rather than raised, so a
    comparison still records it). ``ref_A`` and
    ``ref_B`` are disjoint halves of the reference; all three sets hold ``k = min(n_points,
    #samples, #reference // 2)`` points, drawn without replacement by permutations seeded with
    ``seed`` (the same subsets every call). Subtracting the reference-vs-reference term removes
    most of the entropic and finite-sample bias, so a perfect sampler scores near the 1e-6 floor.
    The reference term is cached per reference subset.
    """
    if samples.ndim != 2 or reference.ndim != 2:
        raise DiffemError("the Sinkhorn divergence compares vectors: (points, dimensions) tensors")
    if samples.shape[1] != reference.shape[1]:
        raise DiffemError(f"samples have {samples.shape[1]} dimensions, the reference {reference.shape[1]}")
    if n_points < 1:
        raise DiffemError(f"n_points must be >= 1, got {n_points}")
    samples, reference = in_box(samples.detach().cpu()), in_box(reference.detach().cpu())
    k = min(n_points, len(samples), len(reference) // 2)
    if len(samples) == 0 and len(reference) >= 2:
        return math.inf
    if k < 1:
        raise DiffemError(
            f"the reference needs at least 2 points inside (-{BOUND:g}, {BOUND:g}); it has {len(reference)}"
        )
    gen = torch.Generator().manual_seed(seed)
    ref = reference[torch.randperm(len(reference), generator=gen)[: 2 * k]]
    ref_a, ref_b = ref[:k], ref[k:]
    xs = samples[torch.randperm(len(samples), generator=gen)[:k]]
    value = sinkhorn_cost(xs, ref_a, reg=reg, max_iter=max_iter) - _reference_term(
        ref_a, ref_b, reg, max_iter
    )
    return max(value, FLOOR)
