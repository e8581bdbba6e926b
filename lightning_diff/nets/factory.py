"""Choose and build the denoising net for a data shape.

Configs describe nets as partial factories (Hydra ``_partial_: true`` turns them into
``functools.partial``) because the data-dependent arguments, the vector dimension or the image
channels and resolution, are only known once the datamodule has been set up. ``build_net`` fills
those in, so no config ever repeats the data shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from lightning_diff.errors import ConfigError
from lightning_diff.nets.mlp import MLP
from lightning_diff.nets.unet import UNet

NET_KINDS = ("auto", "mlp", "unet")


def build_net(
    data_shape: Sequence[int],
    kind: str = "auto",
    mlp: Callable[..., nn.Module] | None = None,
    unet: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Build the net for samples of shape ``data_shape`` (without the batch dimension).

    ``kind="auto"`` picks ``"mlp"`` for vector data ``(dim,)`` and ``"unet"`` for images
    ``(C, H, W)``. The chosen factory is called as ``mlp(dim=D)`` or
    ``unet(in_channels=C, resolution=H)``; a factory left as None means the class with its defaults.
    Every mismatch raises a one-line ``ValueError`` that names the shape and the fix.
    """
    shape = tuple(int(s) for s in data_shape)
    name = str(kind).lower()
    if name not in NET_KINDS:
        raise ConfigError(f"unknown net kind {kind!r}; valid kinds: {', '.join(NET_KINDS)}")
    if name == "auto":
        if len(shape) == 1:
            name = "mlp"
        elif len(shape) == 3:
            name = "unet"
        else:
            raise ConfigError(
                f"net kind 'auto' cannot choose a net for data shape {shape}; it supports vector data (D,) "
                "with net=mlp and images (C, H, W) with net=unet"
            )
    if name == "mlp":
        if len(shape) != 1:
            raise ConfigError(f"net kind 'mlp' needs vector data, got shape {shape}: use net=unet")
        return (mlp or MLP)(dim=shape[0])
    if len(shape) != 3:
        raise ConfigError(
            f"net kind 'unet' needs image data (C, H, W), got shape {shape}; use net=mlp or net=auto"
        )
    channels, height, width = shape
    if height != width:
        raise ConfigError(f"net kind 'unet' needs square images, got shape {shape}; resize or crop the data")
    return (unet or UNet)(in_channels=channels, resolution=height)
