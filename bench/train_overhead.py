"""The Lightning module's training step against a plain PyTorch loop doing the same work.

    .venv/bin/python bench/train_overhead.py case=mlp steps=500 repeats=3
    .venv/bin/python bench/train_overhead.py case=unet steps=60 repeats=3

Cases: ``unet`` is the demo (``experiment=digits_ddpm``: 0.7M-parameter UNet on the 8x8 digits,
batch 128), ``mlp`` the default MLP on two moons (batch 256). Both loops use the same DataModule
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
the cores of a shared machine). With ``data_share=true`` a second table gives the share of
step time the plain loop spends waiting in ``next(iterator)`` on the digits DataModule for each
``workers`` count. Writes Markdown to stdout.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time

import lightning as L
import torch
from common import machine_line, median, parse_args, table
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_diff.checkpoints import build_family_net
from lightning_diff.cli import CONF_DIR
from lightning_diff.resume import step_seed

CASES = {
    "unet": ["experiment=digits_ddpm"],
    "mlp": ["data=moons", "net=mlp"],
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
    "precision": "32-true",
    "clock": "wall",
}
CLIP = 1.0
LOG_EVERY = 25  # conf/trainer/default.yaml's log_every_n_steps
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = CLOCKS["wall"]


def build(case: str, num_workers: int = 0):
    """DataModule and model of a case, composed from ``conf/`` as ``ld-train`` would."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=CASES[case] + [f"data.num_workers={num_workers}", "seed=0"])
    L.seed_everything(0, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, net=build_family_net(cfg, tuple(datamodule.data_shape)))
    return datamodule, model


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
    """Time at the end of every training batch."""

    def __init__(self) -> None:
        self.times: list[float] = []
        # Asked once: without a GPU, torch.cuda.is_available() queries the driver on every call.
        self.cuda = torch.cuda.is_available()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(now())


def lightning_loop(model, datamodule, steps: int, warmup: int, precision: str, full: bool) -> float:
    clock = StepClock()
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
    return (clock.times[-1] - clock.times[warmup - 1]) / steps


def same_weights(a, b) -> bool:
    """Whether two modules hold bit-identical state (raw and EMA weights): the loops did the same work."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def overhead_rows(case: str, args) -> list[list[str]]:
    datamodule, model = build(case)
    initial = copy.deepcopy(model)
    params = sum(p.numel() for p in model.net.parameters())
    results: dict[str, list[float]] = {"plain": [], "lightning, bare": []}
    if args["full_row"]:
        results["lightning, ld-train settings"] = []
    same = True
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
            same = same and same_weights(plain, trained)
    print(
        f"{case}: raw and EMA weights after {args['warmup'] + args['steps']} steps "
        f"{'identical' if same else 'DIFFERENT'} in every loop"
    )
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
        datamodule, model = build("unet", num_workers=workers)
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
        rows += overhead_rows(case, args)
    print(table(["case", "net", "batch", "loop", "ms / step", "max - min", "vs plain"], rows))
    if args["data_share"]:
        print("\nData loading share (digits DataModule, demo UNet, plain loop):\n")
        header = ["num_workers", "ms / step", "ms / step in next(iterator)", "share"]
        print(table(header, data_share_rows(args)))


if __name__ == "__main__":
    main(sys.argv[1:])
