"""What a conditional model is conditioned on: the channel's conditioning, and optionally the
posterior mean of ``x`` given ``y`` under a Gaussian fitted to the lap's training data.

The Gaussian feature (section ``cond``, ``cond.gaussian_mean``) is the image analogue of the
``A^+ y`` features of the projection channel: a closed-form estimate of the clean data that the
network refines instead of rebuilding it from the raw observation, so a lap trained from scratch
starts near what a Gaussian already gives. The Gaussian is the sample mean and covariance of the
rows the M-step trains on (the previous lap's reconstructions; the oracle's clean data): full up
to ``em.gaussian_full_max_dim`` dimensions, else top-``em.gaussian_rank`` PCA plus a diagonal. It is
saved with the checkpoint (auxiliary tensors ``cond_gaussian.*``) so the E-step and ``reconstruct``
compute the same feature.

With few rows for its dimension the sample covariance fits those rows far better than fresh ones,
and the feature is then too good on the M-step's own rows; ``cond.gaussian_shrinkage`` shrinks it
toward a stationary target (:mod:`~diffem_cli.gaussian.shrinkage`), by an amount chosen by
cross-validation (``auto``), fixed, or not at all (``off``).

``cond.residual=on`` also makes the network a residual around the closed-form denoiser centred on
that feature (:class:`~diffem_cli.diffusion.residual.GaussianResidual`), its last layer zero when
trained from scratch: an untrained model is then the Gaussian's denoiser, not noise. The spread of
the training rows around the feature (``sigma``) is measured at each M-step, floored at
``cond.residual_sigma_floor``, and saved with the checkpoint (auxiliary tensor
``cond_residual.sigma``). Under EM the measured spread can feed on itself: draws that cling to the
feature give a smaller ``sigma`` next lap, whose closed-form denoiser pulls the draws closer still;
the floor stops that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffem_cli.core.checks import bad, choice, finite
from diffem_cli.core.errors import DiffemError

AUX_PREFIX = "cond_gaussian."
SIGMA_KEY = "cond_residual.sigma"
SHRINKAGE_KEY = "cond_shrinkage.amount"


GAUSSIAN_MODES: tuple[str, ...] = ("auto", "on", "off")
RESIDUAL_MODES: tuple[str, ...] = ("auto", "on", "off")


@dataclass
class CondOptions:
    """Conditioning of conditional models (section ``cond``): ``gaussian_mean`` adds the Gaussian
    posterior mean of ``x`` given the observation as conditioning channels: ``on`` (linear
    channels only), ``off``, or ``auto`` (on for image data through a linear channel);
    ``residual`` trains the network as a residual around the closed-form denoiser centred on that
    feature: ``on`` (it needs the feature), ``off``, or ``auto`` (whenever the feature is taken);
    ``residual_sigma_floor`` (>= 0) is the least spread that denoiser assumes;
    ``gaussian_shrinkage`` shrinks the feature's full covariance toward a stationary target:
    ``auto`` (the amount chosen by cross-validation), ``off``, or an amount in [0, 1]."""

    gaussian_mean: str = "auto"
    residual: str = "auto"
    residual_sigma_floor: float = 0.0
    gaussian_shrinkage: str = "auto"

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        choice("cond.gaussian_mean", self.gaussian_mean, GAUSSIAN_MODES)
        choice("cond.residual", self.residual, RESIDUAL_MODES)
        if finite("cond.residual_sigma_floor", self.residual_sigma_floor) < 0:
            raise bad("cond.residual_sigma_floor", self.residual_sigma_floor, ">= 0")
        shrinkage_amount(self.gaussian_shrinkage)
        if self.residual == "on" and self.gaussian_mean == "off":
            raise DiffemError(
                "cond.residual=on needs the Gaussian feature: set cond.gaussian_mean=auto or on"
            )


def shrinkage_amount(value: str) -> float | None:
    """``cond.gaussian_shrinkage`` as a fixed amount, None for ``auto``."""
    from diffem_cli.gaussian.shrinkage import parse_shrinkage

    return parse_shrinkage("cond.gaussian_shrinkage", value)


def uses_gaussian(options: CondOptions, channel: Any, shape: tuple[int, ...]) -> bool:
    """Whether a conditional model of data ``shape`` through ``channel`` takes the feature."""
    if options.gaussian_mean == "auto":
        return bool(getattr(channel, "linear", False)) and len(shape) == 3
    return options.gaussian_mean == "on"


def gaussian_only_linear(options: CondOptions, channel: Any) -> str | None:
    """Why ``cond.gaussian_mean=on`` cannot serve ``channel`` (no linear form), or None."""
    if options.gaussian_mean != "on" or getattr(channel, "linear", False):
        return None
    return (
        f"cond.gaussian_mean=on needs a linear channel; {channel.name!r} has no linear form "
        "(set cond.gaussian_mean=auto or off)"
    )


def uses_residual(options: CondOptions, channel: Any, shape: tuple[int, ...]) -> bool:
    """Whether a conditional model of data ``shape`` through ``channel`` is trained as a residual
    around the Gaussian feature; a one-line DiffemError when it is asked for without the feature."""
    if options.residual == "off":
        return False
    gaussian = uses_gaussian(options, channel, shape)
    if options.residual == "auto":
        return gaussian
    if not gaussian:
        raise DiffemError(
            "cond.residual=on needs the Gaussian feature, which cond.gaussian_mean=auto leaves off for "
            "these data: set cond.gaussian_mean=on (linear channels) or cond.residual=off"
        )
    return True


def residual_sigma(
    x: torch.Tensor, cond: torch.Tensor, weight: torch.Tensor | None = None, floor: float = 0.0
) -> float:
    """The spread of training rows ``x`` around their Gaussian feature (the last ``x.shape[1]``
    conditioning channels): the root of the mean square difference over the entries the loss
    counts (``weight``), floored at ``floor`` and at 1e-3 so the closed-form denoiser stays
    defined."""
    diff = (x.double() - cond[:, -x.shape[1] :].double()) ** 2
    if weight is None:
        mse = diff.mean()
    else:
        w = weight.double()
        mse = (diff * w).sum() / w.sum().clamp_min(1.0)
    return max(float(mse.sqrt()), floor, 1e-3)


def residual_around(sigma: float, channels: int):
    """``model -> GaussianResidual(model, channels, sigma)``, the wrapper a residual model is
    trained and sampled through."""
    from diffem_cli.diffusion.residual import GaussianResidual

    return lambda model: GaussianResidual(model, channels, sigma)


def saved_sigma(aux: Mapping[str, torch.Tensor]) -> float:
    """The ``sigma`` a residual model was trained with, from its checkpoint's auxiliary tensors."""
    if SIGMA_KEY not in aux:
        raise DiffemError(
            "this checkpoint was trained with cond.residual=on but holds no cond_residual.sigma"
        )
    return float(aux[SIGMA_KEY])


def fit_feature_prior(x: torch.Tensor, cfg: Any, options: CondOptions, seed: int) -> tuple[Any, float]:
    """The :class:`~diffem_cli.gaussian.prior.GaussianPrior` of the rows ``x`` the M-step trains
    on, and the shrinkage of its covariance (0 for a low-rank one, which is not shrunk)."""
    from diffem_cli.gaussian.moments import fit_moments
    from diffem_cli.gaussian.shrinkage import apply_shrinkage, choose_shrinkage

    shape = tuple(x.shape[1:])
    return apply_shrinkage(
        fit_moments(x, cfg.em.gaussian_rank, seed=seed, full_max_dim=cfg.em.gaussian_full_max_dim),
        shape,
        "cond.gaussian_shrinkage",
        options.gaussian_shrinkage,
        lambda: choose_shrinkage(x, shape, seed),
    )


def feature_aux(prior: Any) -> dict[str, torch.Tensor]:
    """``prior`` as checkpoint auxiliary tensors (read back by :func:`feature_prior`)."""
    return {AUX_PREFIX + k: v for k, v in prior.to_tensors().items()}


def feature_prior(aux: Mapping[str, torch.Tensor]) -> Any:
    """The :class:`~diffem_cli.gaussian.prior.GaussianPrior` saved by :func:`feature_aux`."""
    from diffem_cli.gaussian.prior import GaussianPrior

    found = {k[len(AUX_PREFIX) :]: v for k, v in aux.items() if k.startswith(AUX_PREFIX)}
    if not found:
        raise DiffemError(
            "this checkpoint was trained with cond.gaussian_mean but holds no cond_gaussian tensors"
        )
    return GaussianPrior.from_tensors(found)


def condition(
    channel: Any, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...], prior: Any = None
) -> torch.Tensor:
    """The channel's conditioning of ``obs``, followed, when ``prior`` is given, by the Gaussian
    posterior mean of ``x`` given each observation (``shape[0]`` more channels or features)."""
    cond = channel.condition(obs, shape)
    if prior is None:
        return cond
    from diffem_cli.gaussian.posterior import posterior_mean

    mean = posterior_mean(prior, channel, dict(obs), tuple(shape), device=cond.device)
    return torch.cat([cond, mean.to(cond)], dim=1)


def cond_size(channel: Any, shape: tuple[int, ...], gaussian: bool) -> int:
    """Conditioning channels (images) or features (vectors) :func:`condition` gives, with the
    Gaussian feature or without."""
    return channel.cond_size(shape) + (shape[0] if gaussian else 0)
