"""deepinv's imaging operators as diffem channels.

Each channel holds a deepinv physics (``Inpainting``, ``Blur``, ``Downsampling``,
``CompressedSensing``, ``Denoising``) whose noise model is deepinv's ``GaussianNoise``, and maps
diffem's channel contract onto it:

- ``A`` / ``At`` are the physics' ``A`` / ``A_adjoint``; ``noise_std`` is the ``sigma`` of its
  ``GaussianNoise`` model;
- ``corrupt`` is the physics' forward ``y = N(A(x))``, but every random draw comes from diffem's
  per-sample seeds, never from deepinv's or torch's global generator: inpainting masks from deepinv's
  own ``BernoulliSplittingMaskGenerator`` given one freshly seeded generator per sample, the noise
  from :class:`diffem_deepinv.noise.SeededGaussianNoise` (a ``GaussianNoise`` whose ``eps`` is
  ``per_sample``'s), and the compressed-sensing matrix from the channel's ``matrix_seed`` (set on
  the physics explicitly);
- convolutions and matrix products are computed in float64 inside ``corrupt`` (one physics per
  dtype and device), because float32 kernels may round differently with the batch size and an
  observation must depend on its own sample only.

deepinv (and so torchvision) is imported when a channel first works on tensors, not when this
module loads, so ``diffem channels`` lists these channels without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffem_channels import (
    Channel,
    ChannelError,
    ImportField,
    Observation,
    Param,
    data_kind,
    in_range,
    mix_seed,
    non_negative,
    positive,
)

if TYPE_CHECKING:
    import torch
    from deepinv.physics import LinearPhysics

__all__ = [
    "BlurChannel",
    "CompressedSensingChannel",
    "DeepinvChannel",
    "DenoisingChannel",
    "DownsamplingChannel",
    "InpaintingChannel",
]

MASK_STREAM = 0  # independent draws of one sample use distinct per_sample streams (noise: 1)

PADDINGS = ("circular", "reflect", "replicate", "constant")


def _at_least_one(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


_at_least_one.constraint = ">= 1"  # type: ignore[attr-defined]


def _kernel_size(v: int) -> str | None:
    return None if v == 0 or (v >= 1 and v % 2 == 1) else "must be 0 (automatic) or an odd size >= 1"


_kernel_size.constraint = "0 or odd >= 1"  # type: ignore[attr-defined]


def _noise_param(default: float, check: Any = non_negative) -> Param:
    return Param(
        "noise_sigma",
        float,
        default,
        "std of deepinv's GaussianNoise model added to the measurements",
        check,
    )


class DeepinvChannel(Channel):
    """A diffem channel backed by a linear deepinv physics with a Gaussian noise model.

    Subclasses implement :meth:`make_physics` (the operator for clean data ``shape``, in ``dtype``
    on the CPU) and :meth:`data_shape_of` (the clean shape an observation ``y`` comes from), and
    set ``params`` with a ``noise_sigma``.
    """

    api_version = 2
    linear = True
    float64_corrupt = True
    """Compute ``A x`` in float64 inside ``corrupt`` (convolutions, matrix products)."""

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self._physics_cache: dict[tuple[Any, ...], LinearPhysics] = {}
        self._noise_model: Any = None

    @property
    def noise_model(self) -> Any:
        """The deepinv ``GaussianNoise`` model (seeded per sample) every physics of this channel holds."""
        if self._noise_model is None:
            from diffem_deepinv.noise import SeededGaussianNoise

            self._noise_model = SeededGaussianNoise(self.noise_sigma)
        return self._noise_model

    # -- the deepinv physics, one per (data shape, dtype, device) ---------------------------------

    def make_physics(self, shape: tuple[int, ...], dtype: torch.dtype) -> LinearPhysics:
        """The deepinv operator for clean data of ``shape``, its buffers in ``dtype`` on the CPU."""
        raise NotImplementedError

    def data_shape_of(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The clean data shape whose observations have per-sample shape ``y_shape``."""
        raise NotImplementedError

    def physics(self, shape: tuple[int, ...], like: torch.Tensor) -> LinearPhysics:
        """The physics for clean ``shape`` in ``like``'s dtype and device, with the seeded noise model."""
        shape = tuple(int(s) for s in shape)
        key = (shape, like.dtype, str(like.device))
        phys = self._physics_cache.get(key)
        if phys is None:
            phys = self.make_physics(shape, like.dtype)
            phys.set_noise_model(self.noise_model)
            phys = phys.to(like.device)
            self._physics_cache[key] = phys
        return phys

    def operator_kwargs(self, obs: Mapping[str, torch.Tensor], like: torch.Tensor) -> dict[str, Any]:
        """Per-observation parameters handed to the physics' ``A`` / ``A_adjoint`` (a mask)."""
        return {}

    # -- the channel contract ----------------------------------------------------------------------

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        import torch

        shape = tuple(x.shape[1:])
        self.check_data(shape)
        extra = self.draw(shape, seeds, x)
        work = x.double() if self.float64_corrupt else x
        phys = self.physics(shape, work)
        kw = self.operator_kwargs(extra, work)
        with torch.no_grad():
            y = phys.sensor(phys.noise(phys.A(work, **kw), seeds=seeds, **kw))
        return {"y": y.to(x.dtype), **extra}

    def draw(self, shape: tuple[int, ...], seeds: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample operator parameters stored in the observation besides ``y`` (none by default)."""
        return {}

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.physics(tuple(x.shape[1:]), x).A(x, **self.operator_kwargs(obs, x))

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        shape = self.data_shape_of(tuple(y.shape[1:]))
        return self.physics(shape, y).A_adjoint(y, **self.operator_kwargs(obs, y))

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        """The ``sigma`` of the physics' deepinv ``GaussianNoise`` model."""
        return float(self.noise_model.sigma)

    def cond_size(self, shape: tuple[int, ...]) -> int:
        self.check_data(tuple(shape))
        return shape[0]


def _fit_image(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``y`` (B, C, h, w) brought to the data's (H, W): centred zero padding when smaller."""
    import torch.nn.functional as F

    _, h, w = shape
    dh, dw = h - y.shape[-2], w - y.shape[-1]
    if dh == 0 and dw == 0:
        return y
    return F.pad(y, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


class InpaintingChannel(DeepinvChannel):
    """deepinv's ``Inpainting``: a random mask keeps each entry with probability ``mask``."""

    name = "dinv-inpainting"
    description = "deepinv Inpainting: keep each pixel with probability mask, plus Gaussian noise."
    data_kinds = frozenset({"image", "vector"})
    masked_observation = True
    float64_corrupt = False  # y = mask * x (+ mask * noise) is elementwise: exact in any batch
    params = (
        Param(
            "mask",
            float,
            0.5,
            "probability that an entry is kept (deepinv's Inpainting(mask=float))",
            in_range(0, 1, lo_open=True),
        ),
        Param("pixelwise", bool, True, "one mask per pixel shared by the colour channels (images)"),
        _noise_param(0.0),
    )

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored mask's shape: ``(1, H, W)`` when pixelwise, else the data's."""
        if data_kind(shape) == "image" and self.pixelwise:
            return (1, *shape[1:])
        return tuple(shape)

    def make_physics(self, shape: tuple[int, ...], dtype: torch.dtype) -> LinearPhysics:
        from deepinv.physics import Inpainting

        return Inpainting(img_size=shape, mask=None)  # the mask comes with every observation

    def data_shape_of(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        return y_shape

    def draw(self, shape: tuple[int, ...], seeds: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """deepinv's Bernoulli mask generator, run once per sample on a generator seeded for it."""
        import torch
        from deepinv.physics.generator import BernoulliSplittingMaskGenerator

        image = data_kind(shape) == "image"
        gen = BernoulliSplittingMaskGenerator(
            img_size=shape,
            split_ratio=self.values["mask"],
            pixelwise=self.pixelwise and image,
            rng=torch.Generator(),
        )
        mask_shape = self.mask_shape(shape)
        masks = torch.empty((len(seeds), *mask_shape), dtype=torch.float32)
        for i, s in enumerate(seeds.tolist()):
            m = gen.step(batch_size=None, seed=mix_seed(s, MASK_STREAM))["mask"]
            masks[i] = m[: mask_shape[0]] if image else m
        return {"mask": masks.to(x.device, x.dtype)}

    def operator_kwargs(self, obs: Mapping[str, torch.Tensor], like: torch.Tensor) -> dict[str, Any]:
        return {"mask": obs["mask"].to(like)}

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        y = obs["y"]
        return torch.cat([y, obs["mask"].to(y)], dim=1)

    def cond_size(self, shape: tuple[int, ...]) -> int:
        shape = tuple(shape)
        self.check_data(shape)
        return shape[0] + self.mask_shape(shape)[0]

    def observation_mask(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        y = obs["y"]
        return obs["mask"].to(y).expand_as(y).contiguous()

    def import_fields(self, shape: tuple[int, ...]) -> tuple[ImportField, ...]:
        """The mask, 1 = kept: mask images (white = kept) or a column / safetensors tensor."""
        shape = tuple(shape)
        self.check_data(shape)
        return (
            ImportField(
                "mask",
                self.mask_shape(shape),
                values=(0.0, 1.0),
                binary=True,
                sources=("images", "column", "safetensors"),
                help="1 where the entry is kept, 0 where it is missing (images: white = kept)",
            ),
        )


class BlurChannel(DeepinvChannel):
    """deepinv's ``Blur`` with a (possibly anisotropic, rotated) Gaussian filter."""

    name = "dinv-blur"
    description = "deepinv Blur with a Gaussian filter (deepinv's gaussian_blur), plus Gaussian noise."
    data_kinds = frozenset({"image"})
    params = (
        Param("sigma", float, 1.0, "std of the Gaussian filter, in pixels", positive),
        Param("sigma2", float, 0.0, "std along the second axis (0: equal to sigma, isotropic)", non_negative),
        Param("angle", float, 0.0, "rotation of the filter, in degrees"),
        Param(
            "kernel_size",
            int,
            0,
            "side of the filter (0: deepinv's automatic 2 * int(max sigma / 0.3 + 1) + 1)",
            _kernel_size,
        ),
        Param(
            "padding",
            str,
            "circular",
            "boundary handling of deepinv's conv2d ('valid' observes a smaller image)",
            choices=("valid", *PADDINGS),
        ),
        _noise_param(0.0),
    )

    def kernel(self, dtype: torch.dtype) -> torch.Tensor:
        """deepinv's Gaussian filter ``(1, 1, k, k)``, built in float64 and rounded once to ``dtype``."""
        import torch
        from deepinv.physics.functional import gaussian_blur

        sigmas = (self.sigma, self.sigma2 or self.sigma)
        size = (self.kernel_size, self.kernel_size) if self.kernel_size else None
        k = gaussian_blur(psf_size=size, sigma=sigmas, angle=self.angle, dtype=torch.float64)
        return k.float().to(dtype)  # the same float32 values in every dtype

    @property
    def side(self) -> int:
        if self.kernel_size:
            return self.kernel_size
        return 2 * int(max(self.sigma, self.sigma2) / 0.3 + 1) + 1

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        _, h, w = shape
        k = self.side
        if self.padding == "valid" and (h < k or w < k):
            raise ChannelError(
                f"channel {self.name!r}: a {k}x{k} filter with valid padding needs images of at least {k}x{k}"
            )
        if self.padding != "valid" and (h <= k // 2 or w <= k // 2):
            raise ChannelError(
                f"channel {self.name!r}: a {k}x{k} filter with {self.padding} padding needs images larger "
                f"than {k // 2} pixels, got {h}x{w}; lower sigma or kernel_size"
            )

    def make_physics(self, shape: tuple[int, ...], dtype: torch.dtype) -> LinearPhysics:
        from deepinv.physics import Blur

        return Blur(filter=self.kernel(dtype), padding=self.padding)

    def data_shape_of(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.padding != "valid":
            return y_shape
        c, h, w = y_shape
        return (c, h + self.side - 1, w + self.side - 1)

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return _fit_image(obs["y"], tuple(shape))

    def start(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return self.condition(obs, shape).clone()


class DownsamplingChannel(DeepinvChannel):
    """deepinv's ``Downsampling``: an anti-aliasing filter, then keeping every ``factor``-th pixel."""

    name = "dinv-downsampling"
    description = "deepinv Downsampling (filter, then decimation by factor), plus Gaussian noise."
    data_kinds = frozenset({"image"})
    params = (
        Param("factor", int, 2, "downsampling factor; H and W must be divisible by it", _at_least_one),
        Param(
            "filter",
            str,
            "bicubic",
            "anti-aliasing filter before decimation ('none': bare decimation)",
            choices=("bicubic", "gaussian", "bilinear", "sinc", "none"),
        ),
        Param("padding", str, "circular", "boundary handling of the filter", choices=PADDINGS),
        _noise_param(0.0),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self._kernel: torch.Tensor | None = None

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        _, h, w = shape
        if h % self.factor or w % self.factor:
            raise ChannelError(
                f"channel {self.name!r} needs H and W divisible by factor={self.factor}, got {h}x{w}"
            )
        if self.filter != "none":
            import torch

            k = max(self._filter(torch.float64).shape[-2:])
            if h <= k // 2 or w <= k // 2:
                raise ChannelError(
                    f"channel {self.name!r}: the {self.filter} filter of factor {self.factor} is {k} pixels "
                    f"wide and needs images larger than {k // 2}, got {h}x{w}"
                )

    def _filter(self, dtype: torch.dtype) -> torch.Tensor:
        """deepinv's filter for ``filter`` and ``factor`` (as ``Downsampling`` builds it), in ``dtype``."""
        if self._kernel is None:
            from deepinv.physics import Downsampling

            params = Downsampling.get_filter_parameters(
                img_size=(1, 8, 8), filter=self.filter, factor=self.factor
            )
            self._kernel = params["filter"]
        return self._kernel.to(dtype)

    def make_physics(self, shape: tuple[int, ...], dtype: torch.dtype) -> LinearPhysics:
        from deepinv.physics import Downsampling

        filt = None if self.filter == "none" else self._filter(dtype)
        return Downsampling(img_size=shape, filter=filt, factor=self.factor, padding=self.padding)

    def data_shape_of(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = y_shape
        return (c, h * self.factor, w * self.factor)

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """``y`` upsampled (nearest) back to the data's size."""
        import torch.nn.functional as F

        return F.interpolate(obs["y"], size=tuple(shape[1:]), mode="nearest")

    def start(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return self.condition(obs, shape)


class CompressedSensingChannel(DeepinvChannel):
    """deepinv's ``CompressedSensing``: one Gaussian ``m x n`` matrix, ``A_ij ~ N(0, 1/m)``.

    The matrix is the physics' (one for the whole data set, as in deepinv), drawn from
    ``matrix_seed`` by this channel and set on the physics, so a spec rebuilds it bit for bit. Its
    adjoint needs the clean image's shape, which ``y`` (``m`` numbers) does not tell: the channel
    remembers the shapes it was used with (``check_data``, ``cond_size``, ``corrupt``, ``A``,
    ``condition``); diffem checks the data against the channel before it applies an adjoint.
    """

    name = "dinv-cs"
    description = "deepinv CompressedSensing: a fixed Gaussian m x n matrix (from matrix_seed), plus noise."
    data_kinds = frozenset({"image"})
    params = (
        Param("m", int, 32, "number of measurements (rows of the matrix)", _at_least_one),
        Param("channelwise", bool, False, "measure each colour channel separately with the same matrix"),
        Param("matrix_seed", int, 0, "seed of the Gaussian matrix (one matrix per data shape)", non_negative),
        _noise_param(0.0),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self._shapes: dict[tuple[int, ...], set[tuple[int, ...]]] = {}

    def _remember(self, shape: tuple[int, ...]) -> None:
        c = shape[0]
        y_shape = (c, self.m) if self.channelwise else (self.m,)
        self._shapes.setdefault(y_shape, set()).add(tuple(shape))

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        self._remember(tuple(shape))

    def matrix(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The ``m x n`` matrix for data ``shape``: float64 normal draws / sqrt(m), rounded to float32."""
        import torch

        n = math.prod(shape[1:]) if self.channelwise else math.prod(shape)
        gen = torch.Generator().manual_seed(mix_seed(self.matrix_seed, n))
        return (torch.randn((self.m, n), generator=gen, dtype=torch.float64) / math.sqrt(self.m)).float()

    def make_physics(self, shape: tuple[int, ...], dtype: torch.dtype) -> LinearPhysics:
        import torch
        from deepinv.physics import CompressedSensing

        a = self.matrix(shape).double()
        # deepinv draws its own matrix on construction (from the generator given); it is replaced
        phys = CompressedSensing(
            m=self.m, img_size=shape, channelwise=self.channelwise, dtype=dtype, rng=torch.Generator()
        )
        phys._A = a.to(dtype)
        phys._A_adjoint = a.T.contiguous().to(dtype)
        phys._A_dagger = torch.linalg.pinv(a).to(dtype)
        return phys

    def physics(self, shape: tuple[int, ...], like: torch.Tensor) -> LinearPhysics:
        self._remember(tuple(shape))
        return super().physics(shape, like)

    def data_shape_of(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        shapes = self._shapes.get(tuple(y_shape), set())
        if len(shapes) != 1:
            known = "none" if not shapes else ", ".join(map(str, sorted(shapes)))
            raise ChannelError(
                f"channel {self.name!r} cannot tell the image shape of measurements {tuple(y_shape)} "
                f"(shapes seen: {known}); call check_data(shape) first"
            )
        return next(iter(shapes))

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """deepinv's pseudo-inverse ``A^+ y``, an image of the data's shape."""
        import torch

        y = obs["y"]
        with torch.no_grad():
            return self.physics(tuple(shape), y).A_dagger(y)

    def start(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return self.condition(obs, shape)


class DenoisingChannel(DeepinvChannel):
    """deepinv's ``Denoising``: the identity operator with its Gaussian noise, declared
    ``gaussian_denoising`` so that diffem's denoiser methods (Noise2Self, SURE-Score,
    Ambient-Tweedie) serve it as they serve diffem's ``noise``."""

    name = "dinv-denoising"
    description = "deepinv Denoising: the identity plus deepinv GaussianNoise of std noise_sigma."
    data_kinds = frozenset({"image", "vector"})
    gaussian_denoising = True
    float64_corrupt = False  # y = x + sigma * eps is elementwise
    params = (_noise_param(0.1, positive),)

    def make_physics(self, shape: tuple[int, ...], dtype: torch.dtype) -> LinearPhysics:
        from deepinv.physics import Denoising

        return Denoising(noise_model=self.noise_model)

    def data_shape_of(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        return y_shape

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return obs["y"]
