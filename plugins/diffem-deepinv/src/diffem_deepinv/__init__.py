"""deepinv's imaging operators as diffem channels (import name ``diffem_deepinv``).

The channels are declared under diffem's ``diffem.channels`` entry-point group in this package's
``pyproject.toml`` (``dinv-inpainting``, ``dinv-blur``, ``dinv-downsampling``, ``dinv-cs``,
``dinv-denoising``); diffem finds them there, and only there. deepinv itself is imported when a
channel first computes.
"""

from diffem_deepinv.channels import (
    BlurChannel,
    CompressedSensingChannel,
    DeepinvChannel,
    DenoisingChannel,
    DownsamplingChannel,
    InpaintingChannel,
)

__all__ = [
    "BlurChannel",
    "CompressedSensingChannel",
    "DeepinvChannel",
    "DenoisingChannel",
    "DownsamplingChannel",
    "InpaintingChannel",
]
__version__ = "0.1.0"
