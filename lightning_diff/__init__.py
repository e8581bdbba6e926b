"""lightning_diff: a PyTorch Lightning framework for diffusion and score-based generative models."""

__version__ = "0.1.0"
