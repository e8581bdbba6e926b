"""The Lightning module's training step against a plain PyTorch loop doing the same work.

    .venv/bin/python bench/train_overhead.py case=mlp steps=500 repeats=3
    .venv/bin/python bench/train_overhead.py case=unet steps=60 repeats=3

Cases: ``unet`` is the demo (``experiment=digits_ddpm``: 0.7M-parameter UNet on the 8x8 digits,
batch 128), ``mlp`` the default MLP on two moons (batch 256), ``cifar`` the 35.7M-parameter CIFAR-10
UNet (as in ``unet_throughput.py``) on 4096 random 3 x 32 x 32 images through ``data=array``, batch 128
(a GPU case: one step takes seconds on a CPU). Both loops use the same DataModule
loader, the same network initialisation, AdamW with the warm-up schedule from
``configure_optimizers``, the module's own ``loss``, gradient clipping at 1.0 and the module's EMA
update (``model.ema.update_parameters``). The plain loop seeds its noise generator per step with the
module's ``step_seed``, and every ``LOG_EVERY`` steps reads the loss and stops on NaN/inf, which is
what the module does at its logging steps (``log_every_n_steps`` is ``LOG_EVERY`` in both Lightning
rows). Rows:

* ``plain``: the loop above, no Lightning;
* ``lightning, bare``: ``Trainer`` without progress bar, logger, checkpointing or model summary;
* ``lightning, ld-train settings`` (``full_row=true``): progress bar, model summary and a CSV logger
  every 25 steps, as ``conf/trainer/default.yaml`` and ``logger=csv`` set them (no checkpoint,
  sample-grid or evaluation callbacks, whose cost is not overhead).

Each row reports the median over ``repeats`` runs of milliseconds per optimiser step, timed over
``steps`` steps after ``warmup`` steps, on the ``clock``: ``wall`` (elapsed time, the default; the one
for GPUs) or ``cpu`` (CPU seconds of this process, ``time.process_time``: on a CPU run with one
thread and ``num_workers=0`` the same quantity, but not inflated by other processes competing for
the cores of a shared machine). ``batch`` > 0 replaces the case's batch size; a list (``batch=256,1024``)
gives each case's rows at every size (does a large batch hide the per-step cost?). With
``data_share=true`` a second table gives the share of step time the plain loop spends waiting in
``next(iterator)`` on the digits DataModule for each ``workers`` count. Writes Markdown to stdout.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import machine_line, median, parse_args, table
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_diff.checkpoints import build_family_net
from lightning_diff.cli import CONF_DIR
from lightning_diff.seeding import step_seed

CASES = {
    "unet": ["experiment=digits_ddpm"],
    "mlp": ["data=moons", "net=mlp"],
    "cifar": [
        "data=array",
        "net=unet",
        "net.unet.base_channels=128",
        "net.unet.channel_mult=[1,2,2,2]",
        "net.unet.attn_resolutions=[16]",
    ],
}
DEFAULTS = {
    "case": ["mlp", "unet"],
    "steps": 300,
    "warmup": 20,
    "repeats": 3,
    "full_row": True,
    "data_share": True,
    "workers": [0, 2],
    "threads": 1,
    "batch": [0],
    "precision": "32-true",
    "clock": "wall",
}
CLIP = 1.0
LOG_EVERY = 25  # conf/trainer/default.yaml's log_every_n_steps
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = CLOCKS["wall"]


def build(case: str, num_workers: int = 0, batch: int = 0):
    """DataModule and model of a case, composed from ``conf/`` as ``ld-train`` would (``batch`` > 0
    replaces the case's batch size)."""
    overrides = CASES[case] + [f"data.num_workers={num_workers}", "seed=0"]
    if batch:
        overrides.append(f"data.batch_size={batch}")
    if case == "cifar":
        overrides.append(f"data.path={random_images()}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(0, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, net=build_family_net(cfg, tuple(datamodule.data_shape)))
    model.fit_data(datamodule.train_tensor())
    return datamodule, model


def random_images(count: int = 4096) -> str:
    """A NumPy file of ``count`` random uint8 3 x 32 x 32 images (made once per process)."""
    path = Path(tempfile.gettempdir()) / f"bench_random_images_{os.getpid()}.npy"
    if not path.exists():
        generator = np.random.default_rng(0)
        np.save(path, generator.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8))
    return str(path)


def batches(loader):
    """Endless iteration over a loader, a fresh iterator per epoch (as a training loop does), with the
    sampler told the epoch, as Lightning tells it: the same batches in the same order as ``fit``."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def plain_loop(model, loader, steps: int, warmup: int, precision: str) -> tuple[float, float]:
    """Seconds per step and seconds per step spent in ``next(iterator)``, after ``warmup`` steps."""
    model.train()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    conf = model.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    generator = torch.Generator(device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    stream = batches(loader)
    waited, start = 0.0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start, waited = now(), 0.0
        fetch = now()
        batch = next(stream).to(device, non_blocking=True)
        waited += now() - fetch
        generator.manual_seed(step_seed(model.noise_seed, step))
        with autocast:
            loss = model.loss(batch, generator).mean()
        if (step + 1) % LOG_EVERY == 0 and not math.isfinite(loss.item()):
            raise FloatingPointError(f"train/loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        model.ema.update_parameters(model.net)
    if device == "cuda":
        torch.cuda.synchronize()
    return (now() - start) / steps, waited / steps


class StepClock(Callback):
    """The time at the end of two training steps (counted from 1), device work included.

    The device is synchronised at those two steps only, as the plain loop does: a wait at every
    step would stop the host from queueing the next step's kernels while the GPU works, a cost the
    plain loop does not pay.
    """

    def __init__(self, first: int, last: int) -> None:
        self.marks = {first: 0.0, last: 0.0}
        # Asked once: without a GPU, torch.cuda.is_available() queries the driver on every call.
        self.cuda = torch.cuda.is_available()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.marks:
            if self.cuda:
                torch.cuda.synchronize()
            self.marks[trainer.global_step] = now()

    def seconds(self) -> float:
        first, last = sorted(self.marks)
        return self.marks[last] - self.marks[first]


def lightning_loop(model, datamodule, steps: int, warmup: int, precision: str, full: bool) -> float:
    clock = StepClock(warmup, warmup + steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="auto",
            devices=1,
            max_steps=warmup + steps,
            precision=precision,
            gradient_clip_val=CLIP,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[clock],
            logger=CSVLogger(tmp, name="csv") if full else False,
            log_every_n_steps=LOG_EVERY,
            enable_checkpointing=False,
            enable_progress_bar=full,
            enable_model_summary=full,
            default_root_dir=tmp,
        )
        trainer.fit(model, datamodule=datamodule)
    # From the end of the last warm-up step to the end of the last step: ``steps`` whole steps.
    return clock.seconds() / steps


def weight_difference(a, b) -> float:
    """Largest absolute difference between two modules' states (raw and EMA weights): 0 when the
    loops did the same work bit for bit (on a CPU; GPU kernels such as convolution backward sum in
    an order that varies between runs)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return math.inf
    diffs = [(sa[k].cpu().double() - sb[k].cpu().double()).abs() for k in sa if sa[k].numel()]
    return max(d.max().item() for d in diffs)


def overhead_rows(case: str, args, batch: int = 0) -> list[list[str]]:
    datamodule, model = build(case, batch=batch)
    initial = copy.deepcopy(model)
    params = sum(p.numel() for p in model.net.parameters())
    results: dict[str, list[float]] = {"plain": [], "lightning, bare": []}
    if args["full_row"]:
        results["lightning, ld-train settings"] = []
    difference = 0.0
    for _ in range(args["repeats"]):  # interleaved, so drifts in machine load hit every row alike
        plain = copy.deepcopy(initial)
        secs, _ = plain_loop(
            plain, datamodule.train_dataloader(), args["steps"], args["warmup"], args["precision"]
        )
        results["plain"].append(secs)
        for name in list(results)[1:]:
            trained = copy.deepcopy(initial)
            secs = lightning_loop(
                trained,
                datamodule,
                args["steps"],
                args["warmup"],
                args["precision"],
                full=name != "lightning, bare",
            )
            results[name].append(secs)
            difference = max(difference, weight_difference(plain, trained))
    same = "identical" if difference == 0 else f"differ by at most {difference:.2e}"
    total = args["warmup"] + args["steps"]
    print(f"{case}: raw and EMA weights after {total} steps {same} between the loops")
    base = median(results["plain"])
    rows = []
    for name, values in results.items():
        ms = 1000 * median(values)
        spread = 1000 * (max(values) - min(values))
        rows.append(
            [
                case,
                f"{params / 1e6:.2f}M",
                datamodule.batch_size,
                name,
                f"{ms:.2f}",
                f"{spread:.2f}",
                f"{median(values) / base:.3f}",
            ]
        )
    return rows


def data_share_rows(args) -> list[list[str]]:
    rows = []
    for workers in args["workers"]:
        datamodule, model = build("unet", num_workers=workers, batch=args["batch"][0])
        per_step, waited = plain_loop(
            model, datamodule.train_dataloader(), args["steps"], args["warmup"], args["precision"]
        )
        rows.append(
            [workers, f"{1000 * per_step:.2f}", f"{1000 * waited:.3f}", f"{100 * waited / per_step:.1f}%"]
        )
    return rows


def main(argv: list[str]) -> None:
    global now
    args = parse_args(argv, DEFAULTS, __doc__)
    if args["clock"] not in CLOCKS:
        sys.exit(f"error: clock={args['clock']} is not one of {', '.join(CLOCKS)}")
    now = CLOCKS[args["clock"]]
    torch.set_num_threads(args["threads"])
    print(
        f"{machine_line()}; {args['steps']} timed steps after {args['warmup']}, "
        f"median of {args['repeats']}; precision {args['precision']}; {args['clock']} clock\n"
    )
    rows = []
    for case in args["case"]:
        for batch in args["batch"]:
            case_rows = overhead_rows(case, args, batch)
            print("\n".join("  ".join(map(str, row)) for row in case_rows), flush=True)  # as it goes
            rows += case_rows
    print(table(["case", "net", "batch", "loop", "ms / step", "max - min", "vs plain"], rows))
    if args["data_share"]:
        print("\nData loading share (digits DataModule, demo UNet, plain loop):\n")
        header = ["num_workers", "ms / step", "ms / step in next(iterator)", "share"]
        print(table(header, data_share_rows(args)))


if __name__ == "__main__":
    main(sys.argv[1:])
