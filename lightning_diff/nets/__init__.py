"""Denoising networks. Every net maps ``(x, c_noise)`` to a tensor shaped like ``x``.

``c_noise`` is one float per sample; what it encodes (timestep, log-sigma, ...) is the business of
the denoiser that wraps the net, so the same nets serve every model family.
"""

from lightning_diff.nets.embeddings import NoiseEmbedding, SinusoidalEmbedding
from lightning_diff.nets.factory import NET_KINDS, build_net
from lightning_diff.nets.mlp import MLP
from lightning_diff.nets.precision import PrecisionField
from lightning_diff.nets.unet import UNet

__all__ = [
    "MLP",
    "NET_KINDS",
    "NoiseEmbedding",
    "PrecisionField",
    "SinusoidalEmbedding",
    "UNet",
    "build_net",
]
