"""``torch.compile`` behind the ``compile`` switches of the models (training loss) and samplers.

A switch is ``false`` (eager), ``true`` (``torch.compile``'s default mode) or one of its modes:
``default``, ``reduce-overhead`` (CUDA graphs: the whole network call is replayed as one graph,
which removes the per-kernel launch cost of small networks and batches), ``max-autotune`` (searches
kernel configurations, and uses CUDA graphs too) or ``max-autotune-no-cudagraphs``.

:class:`CompiledDenoiser` is what a sampler calls when its ``compile`` is set: the network call of
every step goes through the compiled module with static shapes (the batch and the noise-level
vector keep their shapes over the grid, so it compiles once per batch shape), while the update's few
elementwise operations and the per-sample noise stay eager, so the noise streams are the same as
without compilation. With CUDA graphs a graph replay overwrites its previous outputs, so each call
starts a new graph step (``torch.compiler.cudagraph_mark_step_begin``) and returns a copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_diff.errors import ConfigError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(value: Any, key: str) -> str | None:
    """The ``torch.compile`` mode a switch names: None for ``false``/None, ``default`` for ``true``.

    Raises a one-line :class:`ConfigError` naming ``key`` for anything else than a known mode."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("false", "none", "off", "no", ""):
            return None
        if lowered in ("true", "on", "yes"):
            return "default"
        if lowered in COMPILE_MODES:
            return lowered
    raise ConfigError(f"{key}={value!r} is not one of false, true, {', '.join(COMPILE_MODES)}")


def compile_module(module: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(module)`` in ``mode`` (the default mode is passed as no mode)."""
    return torch.compile(module) if mode == "default" else torch.compile(module, mode=mode)


class CompiledDenoiser(nn.Module):
    """``denoiser(x, sigma)`` through ``torch.compile`` in ``mode``; other attributes are the
    denoiser's. Not registered on the denoiser, so nothing about it reaches a ``state_dict``."""

    def __init__(self, denoiser: nn.Module, mode: str):
        super().__init__()
        self.denoiser = denoiser
        self.mode = mode
        self.compiled = compile_module(denoiser, mode)
        self.graphs = mode in _GRAPH_MODES

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(x, sigma).clone()
        return self.compiled(x, sigma)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("denoiser"), name)
