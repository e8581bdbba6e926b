"""A residual MLP for vector data of shape (B, dim), e.g. 2-D toy distributions."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_diff.errors import ConfigError
from lightning_diff.nets.embeddings import NoiseEmbedding, as_noise_batch


class _ResidualBlock(nn.Module):
    """``h + Linear(Dropout(SiLU(Norm(h) + proj(SiLU(emb)))))``.

    Pre-activation ordering (normalise, add conditioning, activate, project) mirrors the residual
    blocks of the DDPM UNet (Ho et al. 2020, arXiv 2006.11239) with the convolutions replaced by
    linear layers; the identity path keeps gradients well scaled however many blocks are stacked.
    """

    def __init__(self, hidden_dim: int, emb_dim: int, dropout: float, layer_norm: bool) -> None:
        super().__init__()
        self.norm: nn.Module = nn.LayerNorm(hidden_dim) if layer_norm else nn.Identity()
        self.emb_proj = nn.Linear(emb_dim, hidden_dim)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        a = self.norm(h) + self.emb_proj(emb)
        return h + self.linear(self.dropout(self.act(a)))


class MLP(nn.Module):
    """Noise-conditioned residual MLP: ``forward(x: (B, dim), c_noise: (B,)) -> (B, dim)``.

    Layout: input projection to ``hidden_dim``, ``num_layers`` residual blocks that each add a
    projection of the noise embedding, then ``Norm -> SiLU -> Linear`` back to ``dim``. The noise
    embedding is Transformer sinusoids (Vaswani et al. 2017) of size ``emb_dim`` followed by a small
    MLP, as in DDPM (Ho et al. 2020, arXiv 2006.11239). Injecting it into every block, rather than
    only concatenating it to the input, keeps the conditioning strong in deep stacks.

    The output layer starts at zero, so an untrained net returns exactly 0 for every input. For the
    usual parameterisations (epsilon, x0 or v prediction behind a preconditioned denoiser) this is a
    neutral starting point and avoids large, noisy gradients in the first steps.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 256,
        num_layers: int = 4,
        emb_dim: int = 128,
        dropout: float = 0.0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1 or emb_dim < 2:
            raise ConfigError(
                f"MLP needs dim >= 1, hidden_dim >= 1, emb_dim >= 2; got {dim}, {hidden_dim}, {emb_dim}"
            )
        if num_layers < 0:
            raise ConfigError(f"MLP needs num_layers >= 0, got {num_layers}")
        self.dim = int(dim)
        self.noise_emb = NoiseEmbedding(emb_dim, emb_dim)
        self.emb_act = nn.SiLU()
        self.input_proj = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(
            _ResidualBlock(hidden_dim, emb_dim, dropout, layer_norm) for _ in range(num_layers)
        )
        self.out_norm: nn.Module = nn.LayerNorm(hidden_dim) if layer_norm else nn.Identity()
        self.out_act = nn.SiLU()
        self.output_proj = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """Return a tensor shaped like ``x`` (B, dim) given the noise conditioning ``c_noise`` (B,)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects input of shape (B, {self.dim}), got {tuple(x.shape)}")
        c = as_noise_batch(c_noise, x.shape[0], device=x.device)
        emb = self.emb_act(self.noise_emb(c))
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output_proj(self.out_act(self.out_norm(h)))
