"""Cost of one EMA update: our ``ExponentialAverage`` against Lightning's ``EMAWeightAveraging``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ema_step.py threads=1
    OMP_NUM_THREADS=1 .venv/bin/python bench/ema_step.py part=checkpoints

``part=cost`` (the default) times the per-step update on two nets of a few million parameters: the
CIFAR-10 UNet layout at ``base_channels=64`` (6.5M parameters in 244 tensors) and a residual MLP
of width 1024 (3.6M parameters in 28 tensors). Rows:

* ``ExponentialAverage``: ``model.ema.update_parameters(net)``, what ``DiffusionModule.optimizer_step``
  runs (decay 0.999 with warm-up, one ``_foreach_lerp_`` per device and dtype, cached tensor lists);
* ``EMAWeightAveraging``: Lightning's callback as shipped (``decay=0.999``), driven through its own
  ``setup`` and ``on_train_batch_end`` with a stand-in trainer whose ``global_step`` advances; it
  hands ``AveragedModel`` a per-tensor ``avg_fn``;
* ``WeightAveraging + ema multi_avg_fn``: Lightning's base callback with torch's foreach EMA
  (``get_ema_multi_avg_fn(0.999)``), the cheapest way to use Lightning's class;
* ``PosthocEMA (2 profiles)``: the post-hoc EMA callback's per-step update of its two
  power-function profiles (sigma_rel 0.05 and 0.10), snapshots off; for scale, not a candidate.

Each repeat times ``updates`` updates of every row in turn (after ``warmup`` updates); the table
gives the median over ``repeats`` of milliseconds per update and the range (min-max) over repeats,
on the ``clock``: ``wall`` or ``cpu`` (CPU seconds of this process, which other processes on a
shared machine do not inflate). Before each timed update a ``flush_mb`` buffer is written (untimed),
so the update finds the weights out of the caches, as it does after a training step's forward and
backward passes; ``flush_mb=0`` times back-to-back updates instead, where a net and one copy can
stay in a large last-level cache and the rows that touch more copies look disproportionately slow.

``part=checkpoints`` trains a 4 x 4 linear regression with ``EMAWeightAveraging``, the project's
``RunCheckpoint`` and ``PreemptionCheckpoint`` and prints what the checkpoints hold and whether a
resumed run ends bit-identical to a straight one (one batch per epoch, so the data order plays no
part). Writes Markdown to stdout.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import tempfile
import time
import types
from pathlib import Path

import lightning as L
import torch
from common import machine_line, median, parse_args, sync, table
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lightning_diff.callbacks import PosthocEMA, PreemptionCheckpoint, RunCheckpoint
from lightning_diff.checkpoints import AtomicCheckpointIO
from lightning_diff.models.ema import EMAUpdate, ExponentialAverage
from lightning_diff.nets import MLP, UNet

DEFAULTS = {
    "part": "cost",
    "case": ["unet", "mlp"],
    "updates": 10,
    "warmup": 5,
    "repeats": 7,
    "flush_mb": 1024,
    "threads": 1,
    "clock": "wall",
}
DECAY = 0.999


def build_net(case: str) -> nn.Module:
    torch.manual_seed(0)
    if case == "unet":
        return UNet(3, 32, base_channels=64)
    if case == "mlp":
        return MLP(2, hidden_dim=1024, num_layers=3)
    raise SystemExit(f"error: case={case}: unet or mlp")


class Wrapped(L.LightningModule):
    """The net as the LightningModule that Lightning's callback averages (nothing else in it)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


def ours(net: nn.Module):
    ema = ExponentialAverage(net, EMAUpdate(DECAY, warmup=True))
    ema.requires_grad_(False)
    return lambda: ema.update_parameters(net)


def lightning_callback(callback: L.Callback, net: nn.Module):
    module = Wrapped(net)
    trainer = types.SimpleNamespace(global_step=0, is_global_zero=True)
    callback.setup(trainer, module, "fit")
    if isinstance(callback, PosthocEMA):
        callback.on_train_start(trainer, module)

    def update() -> None:
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, module, None, None, 0)

    return update


ROWS = {
    "ExponentialAverage": ours,
    "EMAWeightAveraging": lambda net: lightning_callback(EMAWeightAveraging(decay=DECAY), net),
    "WeightAveraging + ema multi_avg_fn": lambda net: lightning_callback(
        WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(DECAY)), net
    ),
    "PosthocEMA (2 profiles)": lambda net: lightning_callback(
        PosthocEMA(tempfile.gettempdir(), every_n_steps=0, save_at_end=False), net
    ),
}


def seconds_per_update(update, count: int, clock, flush: torch.Tensor | None) -> float:
    if flush is None:
        sync()
        start = clock()
        for _ in range(count):
            update()
        sync()
        return (clock() - start) / count
    total = 0.0
    for _ in range(count):
        flush.add_(1.0)
        sync()
        start = clock()
        update()
        sync()
        total += clock() - start
    return total / count


def cost(args: dict) -> None:
    clock = time.process_time if args["clock"] == "cpu" else time.perf_counter
    flush = torch.zeros(args["flush_mb"] * 2**18) if args["flush_mb"] else None
    caches = f"{args['flush_mb']} MB written before each update" if flush is not None else "warm caches"
    print(
        f"{machine_line()}; {args['updates']} updates per timing after {args['warmup']}, "
        f"{args['repeats']} repeats, {args['clock']} clock, {caches}\n"
    )
    rows = []
    for case in args["case"]:
        net = build_net(case)
        tensors = [*net.parameters(), *net.buffers()]
        updates = {name: make(net) for name, make in ROWS.items()}
        for update in updates.values():
            for _ in range(args["warmup"]):
                update()
        times: dict[str, list[float]] = {name: [] for name in updates}
        for _ in range(args["repeats"]):  # rows interleaved, so that drifts of the machine hit all
            for name, update in updates.items():
                times[name].append(1000 * seconds_per_update(update, args["updates"], clock, flush))
        base = median(times["ExponentialAverage"])
        for name, values in times.items():
            mid = median(values)
            rows.append([
                case, f"{sum(t.numel() for t in tensors) / 1e6:.2f}M", len(tensors), name,
                f"{mid:.3f}", f"{min(values):.3f}-{max(values):.3f}", f"{mid / base:.2f}",
            ])  # fmt: skip
    header = ["net", "parameters", "tensors", "update", "ms / update (median)", "range", "x ours"]
    print(table(header, rows))


# ---- part=checkpoints: what Lightning's callback leaves in the project's checkpoints ----------------
class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 4)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 4, generator=generator)
        self.y = torch.randn(8, 4, generator=generator)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # One batch per epoch: every step sees the same batch, whatever the resume point.
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8)


class RawRecorder(L.Callback):
    """The raw weights at the end of every step, before any end-of-fit hook."""

    def __init__(self):
        self.raw: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


class SigtermDuring(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(run_dir: Path, max_steps: int, ema_first: bool = True, sigterm_at: int = 0, ckpt_path=None):
    ema = EMAWeightAveraging(decay=0.9)
    preemption = PreemptionCheckpoint(run_dir / "checkpoints")
    first = [ema, preemption] if ema_first else [preemption, ema]
    recorder = RawRecorder()
    callbacks = [*first, recorder, RunCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}",
                 every_n_train_steps=2, save_top_k=-1, save_last=True, enable_version_counter=False,
                 auto_insert_metric_name=False)]  # fmt: skip
    if sigterm_at:
        callbacks.append(SigtermDuring(sigterm_at))
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run_dir, plugins=[AtomicCheckpointIO()],
        accelerator="cpu", deterministic=True,
    )  # fmt: skip
    with contextlib.suppress(SIGTERMException):  # the preemption callback has saved by then
        trainer.fit(Regression(), ckpt_path=ckpt_path)
    preemption.restore_handlers()
    return recorder.raw


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(args: dict) -> None:
    root = Path(tempfile.mkdtemp(prefix="ema_checkpoints_"))
    rows = []
    straight_raw = fit(root / "straight", 8)
    straight = load(root / "straight" / "checkpoints" / "last.ckpt")

    # A periodic checkpoint (step 4), and the last.ckpt written at the end of fit (step 5, not a
    # multiple of every_n_train_steps, so RunCheckpoint writes it in on_train_end).
    raw = fit(root / "five", 5)
    periodic = load(root / "five" / "checkpoints" / "step4.ckpt")
    last = load(root / "five" / "checkpoints" / "last.ckpt")
    rows.append(["periodic step 4: raw weights kept (current_model_state)",
                 same(periodic["current_model_state"], raw[4])])  # fmt: skip
    rows.append(["periodic step 4: EMA differs from raw (state_dict)",
                 not same(periodic["state_dict"], raw[4])])  # fmt: skip
    rows.append(["last.ckpt at the end of fit (step 5): raw weights kept",
                 same(last["current_model_state"], raw[5])])  # fmt: skip
    rows.append(["last.ckpt at the end of fit: 'raw' equals the EMA",
                 same(last["current_model_state"], last["state_dict"])])  # fmt: skip

    fit(root / "five", 8, ckpt_path=root / "five" / "checkpoints" / "last.ckpt")
    resumed = load(root / "five" / "checkpoints" / "last.ckpt")
    rows.append(["resume from last.ckpt (5 -> 8): raw bit-identical to straight",
                 same(resumed["current_model_state"], straight["current_model_state"])])  # fmt: skip
    rows.append(["resume from last.ckpt (5 -> 8): EMA bit-identical to straight",
                 same(resumed["state_dict"], straight["state_dict"])])  # fmt: skip

    fit(root / "periodic", 8, ckpt_path=root / "five" / "checkpoints" / "step4.ckpt")
    resumed = load(root / "periodic" / "checkpoints" / "last.ckpt")
    rows.append(["resume from step4.ckpt (4 -> 8): raw and EMA bit-identical",
                 same(resumed["current_model_state"], straight["current_model_state"])
                 and same(resumed["state_dict"], straight["state_dict"])])  # fmt: skip

    for ema_first in (True, False):
        run = root / f"sigterm_{ema_first}"
        raw = fit(run, 8, ema_first=ema_first, sigterm_at=3)
        saved = load(run / "checkpoints" / "last.ckpt")
        order = "EMA callback before" if ema_first else "EMA callback after"
        rows.append([f"SIGTERM at step 3, {order} PreemptionCheckpoint: saved at step",
                     saved["global_step"]])  # fmt: skip
        rows.append(["... raw weights kept", same(saved["current_model_state"], raw[3])])
        fit(run, 8, ema_first=ema_first, ckpt_path=run / "checkpoints" / "last.ckpt")
        resumed = load(run / "checkpoints" / "last.ckpt")
        rows.append(["... resumed to 8: raw and EMA bit-identical to straight",
                     same(resumed["current_model_state"], straight["current_model_state"])
                     and same(resumed["state_dict"], straight["state_dict"])])  # fmt: skip
    print(f"{machine_line()}; straight run: {len(straight_raw)} steps\n")
    print(table(["check", "result"], rows))


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    torch.set_num_threads(args["threads"])
    {"cost": cost, "checkpoints": checkpoints}[args["part"]](args)


if __name__ == "__main__":
    main(sys.argv[1:])
