"""The DDPM UNet for images of shape (B, C, H, W).

The architecture follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models"
(arXiv 2006.11239, Appendix B), which in turn builds on PixelCNN++ and the Wide ResNet: a
convolutional encoder/decoder with skip connections, two residual blocks per resolution, GroupNorm,
self-attention at the 16x16 resolution and a timestep embedding added inside every residual block.
With ``base_channels=128, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,)`` it is the 35.7M
parameter CIFAR-10 network of that paper.

Deliberate differences from the reference implementation:

* GroupNorm uses ``gcd(num_groups, channels)`` groups, so small nets (e.g. base 32 on 8x8 digits)
  and odd channel counts after skip concatenation always get a valid group count.
* Attention calls ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
  kernel when one is available, and supports several heads.
* Downsampling is a 3x3 convolution with stride 2 and symmetric padding, so every resolution that
  is divisible by ``2**(len(channel_mult) - 1)`` (8, 16, 28, 32, 64, ...) round-trips exactly.
* Only the final convolution is zero-initialised. The reference also zero-initialises the last
  layer of each residual and attention branch; doing that as well would cut every path from the
  noise embedding to the output until several updates have passed, which makes small nets on small
  data slow to start conditioning on the noise level.
* Optional scale-shift conditioning (``use_scale_shift_norm``, from Nichol & Dhariwal 2021,
  arXiv 2102.09672) is available; the default is DDPM's plain addition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_diff.errors import ConfigError
from lightning_diff.nets.embeddings import NoiseEmbedding, as_noise_batch


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    """Give a (B, C) tensor trailing singleton dims so it broadcasts against (B, C, *spatial)."""
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm whose group count divides ``channels`` (``gcd(num_groups, channels)`` groups)."""
    return nn.GroupNorm(math.gcd(max(int(num_groups), 1), channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """DDPM residual block: two ``GroupNorm -> SiLU -> Conv3x3`` stages with the embedding added between.

    The noise embedding (already passed through SiLU by the caller) is projected to the block's
    channel count and added after the first convolution, or, with ``use_scale_shift_norm``, used as
    a per-channel scale and shift of the second normalisation. Dropout sits before the second
    convolution as in Ho et al. 2020. A 1x1 convolution matches channels on the skip path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        num_groups: int,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = _append_dims(self.emb_proj(emb), h.ndim)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    ``GroupNorm -> 1x1 conv to q, k, v -> softmax(q k^T / sqrt(d)) v -> 1x1 conv`` as in the DDPM
    UNet; q, k and v come from one fused 1x1 convolution, which has exactly the parameters of three
    separate ones.
    """

    def __init__(self, channels: int, num_groups: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ConfigError(f"attention over {channels} channels cannot be split in num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(dim=1))  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, *spatial)
        return x + self.proj(out)


class ResAttnBlock(nn.Module):
    """A residual block optionally followed by self-attention: one step of a UNet level.

    Grouping the two keeps the skip bookkeeping simple: every such step pushes exactly one tensor
    onto the skip stack on the way down and pops exactly one on the way up.
    """

    def __init__(self, res: ResBlock, attn: AttnBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn: nn.Module = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    """Halve the spatial size with a strided 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial size with nearest-neighbour interpolation followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM UNet (Ho et al. 2020, arXiv 2006.11239): ``forward(x: (B, C, H, W), c_noise: (B,))``.

    Args:
        in_channels: image channels; the output has the same number.
        resolution: side length of the (square) training images. It decides at which levels
            attention is placed and must be divisible by ``2**(len(channel_mult) - 1)``.
        base_channels: channels of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: one multiplier per resolution level; each level after the first halves the size.
        num_res_blocks: residual blocks per level on the way down (the way up has one more, for the
            extra skip connection, as in DDPM).
        attn_resolutions: side lengths at which self-attention follows each residual block. The
            middle of the net always has one attention block, as in DDPM.
        dropout: dropout rate inside residual blocks (0.1 for DDPM's CIFAR-10 net).
        num_groups: requested GroupNorm groups; reduced to a divisor of each channel count.
        emb_dim: width of the noise embedding; ``4 * base_channels`` when None, as in DDPM.
        num_heads: attention heads (DDPM uses 1).
        use_scale_shift_norm: condition by scale and shift instead of addition.

    Any sequence is accepted for ``channel_mult`` and ``attn_resolutions``, including Hydra's
    ``ListConfig``. The final convolution starts at zero, so an untrained net outputs exactly 0.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        emb_dim: int | None = None,
        num_heads: int = 1,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mult)
        attn_res = {int(r) for r in attn_resolutions}
        if not mults:
            raise ConfigError("UNet needs a non-empty channel_mult, e.g. (1, 2, 2)")
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1 or min(mults) < 1:
            raise ConfigError(
                "UNet needs in_channels, base_channels, num_res_blocks and every channel_mult >= 1; got "
                f"{in_channels}, {base_channels}, {num_res_blocks}, {mults}"
            )
        factor = 2 ** (len(mults) - 1)
        if resolution < 1 or resolution % factor != 0:
            raise ConfigError(
                f"resolution {resolution} is not divisible by {factor} = 2**(len(channel_mult)-1); "
                "change net.unet.channel_mult or data.resolution"
            )
        self.in_channels = int(in_channels)
        self.resolution = int(resolution)
        self.downsample_factor = factor
        emb_dim = 4 * base_channels if emb_dim is None else int(emb_dim)

        def block(cin: int, cout: int, attn: bool) -> ResAttnBlock:
            return ResAttnBlock(
                ResBlock(cin, cout, emb_dim, dropout, num_groups, use_scale_shift_norm),
                AttnBlock(cout, num_groups, num_heads) if attn else None,
            )

        self.noise_emb = NoiseEmbedding(base_channels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Encoder: remember the channel count of every tensor pushed onto the skip stack.
        ch = base_channels
        res = self.resolution
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                out_ch = base_channels * mult
                self.down.append(block(ch, out_ch, res in attn_res))
                ch = out_ch
                skip_channels.append(ch)
            if level != len(mults) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skip_channels.append(ch)

        self.mid = nn.ModuleList([block(ch, ch, attn=True), block(ch, ch, attn=False)])

        # Decoder: one more block per level than the encoder, each consuming one skip tensor.
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            for _ in range(num_res_blocks + 1):
                out_ch = base_channels * mults[level]
                self.up.append(block(ch + skip_channels.pop(), out_ch, res in attn_res))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        assert not skip_channels

        self.norm_out = group_norm(ch, num_groups)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """Return a tensor shaped like ``x`` given the noise conditioning ``c_noise`` of shape (B,)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"UNet expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ConfigError(
                f"UNet input size {tuple(x.shape[-2:])} is not divisible by {self.downsample_factor}"
            )
        c = as_noise_batch(c_noise, x.shape[0], device=x.device)
        emb = F.silu(self.noise_emb(c))

        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, emb) if isinstance(module, ResAttnBlock) else module(h)
            skips.append(h)
        for module in self.mid:
            h = module(h, emb)
        for module in self.up:
            if isinstance(module, ResAttnBlock):
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))
