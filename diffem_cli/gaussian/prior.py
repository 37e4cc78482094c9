"""``GaussianPrior``: ``N(mean, Sigma)`` on flattened data, full or low rank plus a diagonal (in
pixel coordinates or an operator's eigenbasis), and its round trip through named tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.linalg import from_coords, psd_sqrt, to_coords

if TYPE_CHECKING:
    from diffem_cli.gaussian.operators import Probed

_F64 = torch.float64


@dataclass(eq=False)
class GaussianPrior:
    """``N(mean, Sigma)`` on flattened data: ``Sigma = cov`` (full), or ``B diag(diag) B^T + factor
    factor^T`` with ``B`` the identity, or, when ``basis`` ``V`` ``(k, k)`` (orthonormal, ``k`` dividing
    ``D``) is given, ``I_{D/k} (x) V``: ``V`` acting on each consecutive block of ``k`` coordinates
    (each colour channel of an image). That basis is an operator's eigenbasis, in which the
    residual is diagonal (a spectrum).

    ``probed`` is what :func:`~diffem_cli.gaussian.fit.fit_gaussian` learnt about its channel's
    operator (how ``A`` acts, probed once), for :func:`~diffem_cli.gaussian.fit.gaussian_start` to
    reuse on the same channel and shape; ``None`` for any other prior. It is not stored:
    :meth:`to_tensors` drops it, and a prior loaded back is probed afresh when sampled.
    """

    mean: Tensor
    cov: Tensor | None = None
    diag: Tensor | None = None
    factor: Tensor | None = None
    basis: Tensor | None = None
    probed: Probed | None = field(default=None, repr=False)
    _root: Tensor | None = field(default=None, init=False, repr=False)

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
        """This prior with its tensors on ``device`` (without ``probed``)."""
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
        """The float64 principal square root ``L`` (``L L^T = cov``, full covariance only), cached:
        unique, so a seed draws the same samples on every device up to rounding."""
        if self.cov is None:
            raise ValueError("root() needs a full covariance")
        if self._root is None:
            self._root = psd_sqrt(self.covariance())
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
