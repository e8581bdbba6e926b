"""Embeddings of the per-sample noise-conditioning scalar ``c_noise``.

Every net in this package is conditioned on one real number per sample. What the number means
(a DDPM timestep in [0, 999], ``0.25 * log(sigma)`` for EDM-style preconditioning, ``999 * t`` for a
continuous-time model, ...) is decided by the denoiser wrapping the net, never by the net itself.
The embeddings below therefore accept any finite float, fractional or large, and treat it as a
position on the real line.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_diff.errors import ConfigError


def as_noise_batch(c_noise: Tensor | float, batch_size: int, device: torch.device | None = None) -> Tensor:
    """Return ``c_noise`` as a float32 tensor of shape (B,).

    A 0-d tensor or a Python float is repeated over the batch; a (B, 1) tensor is flattened. Integer
    timesteps are converted to float, so DDPM code may pass ``t`` directly. The result is float32
    even under half precision: sinusoids of values near 1000 lose their fine frequencies in fp16.
    """
    c = torch.as_tensor(c_noise, device=device).to(torch.float32).reshape(-1)
    if c.numel() == 1 and batch_size != 1:
        c = c.expand(batch_size)
    if c.shape[0] != batch_size:
        raise ValueError(f"c_noise has {c.shape[0]} values but the batch has {batch_size} samples")
    return c


class SinusoidalEmbedding(nn.Module):
    """Map scalars of shape (B,) to (B, dim) with fixed sine/cosine features.

    This is the positional encoding of Vaswani et al. 2017 ("Attention Is All You Need",
    arXiv 1706.03762), reused for diffusion time by Ho et al. 2020 (arXiv 2006.11239). Frequencies are
    geometrically spaced from 1 down to ``1 / max_period``, so the embedding resolves both unit
    steps of a discrete timestep and slow variation over the whole [0, 1000) range. The first half
    of the output holds cosines and the second half sines; an odd ``dim`` gets a final zero column.

    The features are plain functions of the input, so there is nothing to learn and the module has
    no parameters; its frequency table is a non-persistent buffer so that it follows ``.to(device)``
    without appearing in checkpoints.
    """

    freqs: Tensor

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2:
            raise ConfigError(f"SinusoidalEmbedding needs dim >= 2, got {dim}")
        if max_period <= 1.0:
            raise ConfigError(f"SinusoidalEmbedding needs max_period > 1, got {max_period}")
        self.dim = int(dim)
        self.max_period = float(max_period)
        half = self.dim // 2
        exponents = torch.arange(half, dtype=torch.float32) / half
        self.register_buffer("freqs", torch.exp(-math.log(self.max_period) * exponents), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embed ``c_noise`` of shape (B,) (any real values) into shape (B, dim), float32."""
        c = c_noise.to(torch.float32).reshape(-1)
        args = c.unsqueeze(-1) * self.freqs.unsqueeze(0)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2 == 1:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}"


class NoiseEmbedding(nn.Module):
    """Sinusoidal features followed by ``Linear -> SiLU -> Linear``, giving (B, hidden_dim).

    The two-layer MLP on top of the fixed features follows the timestep embedding of the DDPM UNet
    (Ho et al. 2020, arXiv 2006.11239): it lets the net learn which frequencies matter for its
    particular noise parameterisation, which is what makes the nets indifferent to what ``c_noise``
    means. Consumers apply their own SiLU and projection per block, as DDPM does.
    """

    def __init__(self, dim: int, hidden_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.sinusoidal = SinusoidalEmbedding(dim, max_period=max_period)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.out_dim = int(hidden_dim)

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embed ``c_noise`` of shape (B,) into shape (B, hidden_dim)."""
        emb = self.sinusoidal(c_noise).to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(emb)))
