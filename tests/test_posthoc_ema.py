"""Post-hoc EMA (Karras et al. 2024): the profile math, reconstruction, the callback, the command."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_named, compose_train
from omegaconf import open_dict

from lightning_diff.callbacks.ema_snapshots import (
    PosthocEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_ema_beta,
    profile_weights,
    read_snapshot,
    reconstruct,
    sigma_rel_to_gamma,
)
from lightning_diff.checkpoints import load_model, read_checkpoint
from lightning_diff.cli.posthoc_ema import posthoc_ema
from lightning_diff.cli.sample import sample
from lightning_diff.cli.train import train
from lightning_diff.errors import CheckpointError, ConfigError


def paper_sigma_rel(gamma: float) -> float:
    """Karras et al. 2024, Sec. 3: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


def track(sequence, gamma: float):
    """The power-function EMA after every step of ``sequence`` (``sequence[t - 1]`` = weights after
    step t), by the paper's recursion in float64."""
    out, average = [], None
    for t, theta in enumerate(sequence, start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        average = theta if average is None else beta * average + (1 - beta) * theta
        out.append(average)
    return out


# ---- (i) gamma from sigma_rel -------------------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.10, 0.2, 0.29, 0.3])
def test_gamma_from_sigma_rel_solves_the_papers_formula_and_round_trips(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert paper_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # The largest root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s), s = sigma_rel^-2.
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    assert gamma == pytest.approx(max(r.real for r in roots if abs(r.imag) < 1e-6), rel=1e-6, abs=1e-6)


def test_gamma_takes_the_papers_values():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    # Narrower profiles have larger exponents.
    assert sigma_rel_to_gamma(0.05) > sigma_rel_to_gamma(0.07) > sigma_rel_to_gamma(0.10)


@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
def test_discrete_weights_are_the_unrolled_update(gamma):
    """``w_t(tau)`` is what the update ``beta_t = (1 - 1/t)^(gamma+1)`` gives the weights of step tau."""
    steps = 300
    direct = track(list(np.eye(steps)), gamma)  # tracking one-hot "weights" gives the weights
    for t in (1, 2, 17, steps):
        np.testing.assert_allclose(profile_weights(t, gamma), direct[t - 1][:t], rtol=1e-10, atol=1e-15)
    assert profile_weights(steps, gamma).sum() == pytest.approx(1.0, abs=1e-12)
    assert power_ema_beta(1, gamma) == 0.0


# ---- (ii) reconstruction ------------------------------------------------------------------------
SNAPSHOT_WIDTHS = (0.05, 0.10)


@pytest.fixture(scope="module")
def random_walk():
    """2000 steps of a 16-d random walk, snapshots of two profiles every 100 steps."""
    theta = np.cumsum(np.random.default_rng(0).standard_normal((2000, 16)), axis=0)
    tracked = {s: track(theta, sigma_rel_to_gamma(s)) for s in SNAPSHOT_WIDTHS}
    snapshots = [(t, s) for t in range(100, 2001, 100) for s in SNAPSHOT_WIDTHS]
    return theta, tracked, snapshots


def _rebuild(random_walk, sigma_rel: float, step: int):
    _, tracked, snapshots = random_walk
    columns = [(t, sigma_rel_to_gamma(s)) for t, s in snapshots if t <= step]
    x, residual = posthoc_coefficients(columns, step, sigma_rel_to_gamma(sigma_rel))
    kept = [(t, s) for t, s in snapshots if t <= step]
    return sum(c * tracked[s][t - 1] for c, (t, s) in zip(x, kept, strict=True)), residual


def test_reconstruction_matches_a_power_ema_tracked_directly(random_walk):
    theta, tracked, _ = random_walk
    rebuilt, residual = _rebuild(random_walk, 0.07, 2000)
    direct = track(theta, sigma_rel_to_gamma(0.07))[-1]
    scale = np.linalg.norm(direct - theta[-1])  # how far an EMA sits from the raw weights
    assert np.linalg.norm(rebuilt - direct) < 2e-3 * scale
    assert residual < 1e-2
    # Far closer than either tracked profile: the test tells the widths apart.
    for s in SNAPSHOT_WIDTHS:
        assert np.linalg.norm(tracked[s][-1] - direct) > 50 * np.linalg.norm(rebuilt - direct)


@pytest.mark.parametrize(("sigma_rel", "step"), [(0.05, 2000), (0.10, 1500)])
def test_reconstructing_a_tracked_profile_at_a_snapshot_gives_it_back(random_walk, sigma_rel, step):
    _, tracked, _ = random_walk
    rebuilt, residual = _rebuild(random_walk, sigma_rel, step)
    np.testing.assert_allclose(rebuilt, tracked[sigma_rel][step - 1], rtol=1e-9, atol=1e-9)
    assert residual < 1e-6


def test_grid_inner_products_approach_the_papers_closed_form():
    """At large t the sums over the step grid agree with the paper's integrals of the continuous
    profiles, <p_a, p_b> = (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))."""
    snaps = [(t, sigma_rel_to_gamma(s)) for t in (20_000, 30_000, 40_000) for s in SNAPSHOT_WIDTHS]
    target = (40_000, sigma_rel_to_gamma(0.08))

    def inner(a, b):
        (ta, ga), (tb, gb) = a, b
        m = min(ta, tb)
        return (ga + 1) * (gb + 1) * m ** (ga + gb + 1) / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1))

    gram = np.array([[inner(a, b) for b in snaps] for a in snaps])
    closed = np.linalg.solve(gram, np.array([inner(a, target) for a in snaps]))
    grid, _ = posthoc_coefficients(snaps, *target)
    np.testing.assert_allclose(grid, closed, rtol=1e-2, atol=1e-3)


# ---- (iii) a training run and the command -------------------------------------------------------
class WeightRecorder(L.Callback):
    """The net's floating-point weights after every optimiser step, in float64."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = pl_module.net.state_dict()
        self.weights[trainer.global_step] = {
            k: v.double().clone() for k, v in state.items() if v.is_floating_point()
        }


def _add_callback(cfg, name: str, target: type, **kwargs):
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": f"{__name__}.{target.__name__}", **kwargs}
    return cfg


RUN = ["experiment=moons_ddpm", "callbacks=with_posthoc_ema", "callbacks.posthoc_ema.every_n_steps=2"]


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("phema") / "run"
    cfg = _add_callback(compose_train([*RUN, "trainer.max_steps=7"], run_dir), "recorder", WeightRecorder)
    _, objects = train(cfg)
    recorder = next(c for c in objects["trainer"].callbacks if isinstance(c, WeightRecorder))
    return run_dir, recorder.weights


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _direct(
    weights: dict[int, dict[str, torch.Tensor]], sigma_rel: float, step: int
) -> dict[str, torch.Tensor]:
    names = weights[1].keys()
    return {
        n: track([weights[t][n] for t in range(1, step + 1)], sigma_rel_to_gamma(sigma_rel))[-1]
        for n in names
    }


def test_training_writes_snapshots_of_the_power_emas_of_its_weights(phema_run):
    run_dir, weights = phema_run
    files = sorted(p.name for p in (run_dir / "posthoc_ema").iterdir())
    assert files == ["step0000002.pt", "step0000004.pt", "step0000006.pt", "step0000007.pt"]  # 7: the end
    for step in (2, 4, 6, 7):
        content = read_snapshot(run_dir / "posthoc_ema" / f"step{step:07d}.pt", mmap=False)
        assert content["step"] == step and content["start_step"] == 0
        assert [p["sigma_rel"] for p in content["profiles"]] == [0.05, 0.10]
        for profile in content["profiles"]:
            expected = _direct(weights, profile["sigma_rel"], step)
            for name, value in expected.items():
                torch.testing.assert_close(profile["state_dict"][name].double(), value, rtol=1e-5, atol=1e-6)
    # The checkpoint of step 6 carries the profiles of step 6.
    state = read_checkpoint(run_dir / "checkpoints" / "step0000006.ckpt")["callbacks"]["PosthocEMA"]
    snap = read_snapshot(run_dir / "posthoc_ema" / "step0000006.pt", mmap=False)
    assert state["step"] == 6
    for saved, profile in zip(state["profiles"], snap["profiles"], strict=True):
        for name, value in saved.items():
            assert torch.equal(value, profile["state_dict"][name])


def test_cli_writes_a_checkpoint_whose_ema_is_the_reconstruction(phema_run, tmp_path):
    run_dir, weights = phema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = posthoc_ema(
        compose_named("posthoc_ema", [f"ckpt={ckpt}", "sigma_rel=0.08", f"out={tmp_path / 'e.ckpt'}"])
    )
    model, _ = load_model(out)
    rebuilt, info = reconstruct(run_dir / "posthoc_ema", 0.08, 7)
    assert info["snapshot_steps"] == [2, 4, 6, 7] and model.run_meta["posthoc_ema"]["sigma_rel"] == 0.08
    ema = model.ema.module.state_dict()
    direct = _direct(weights, 0.08, 7)  # 8 snapshot columns span the 7 steps: the fit is exact
    for name, value in rebuilt.items():
        assert torch.equal(ema[name], value.to(ema[name].dtype)), name
        if value.is_floating_point():
            torch.testing.assert_close(ema[name].double(), direct[name], rtol=1e-4, atol=1e-5)
    # Everything but the EMA weights is the input checkpoint's.
    before, after = read_checkpoint(ckpt), read_checkpoint(out)
    assert before["state_dict"].keys() == after["state_dict"].keys()
    changed = {
        k for k in before["state_dict"] if not torch.equal(before["state_dict"][k], after["state_dict"][k])
    }
    assert changed and all(k.startswith("ema.module.") for k in changed)
    assert before.keys() == after.keys()
    assert all(_same(before[k], after[k]) for k in before if k not in ("state_dict", "lightning_diff"))
    meta = dict(after["lightning_diff"])
    assert meta.pop("posthoc_ema")["step"] == 7 and _same(meta, before["lightning_diff"])
    # ld-sample reads it like any checkpoint.
    samples = sample(compose_named("sample", [f"ckpt={out}", "num_samples=4", f"out={tmp_path / 's.npy'}"]))
    assert samples.shape == (4, 2) and np.isfinite(samples).all()


def test_cli_rebuilding_a_tracked_width_at_its_snapshot_gives_the_snapshot(phema_run, tmp_path):
    run_dir, _ = phema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = posthoc_ema(
        compose_named("posthoc_ema", [f"ckpt={ckpt}", "sigma_rel=0.05", f"out={tmp_path / 'e.ckpt'}"])
    )
    ema = load_model(out)[0].ema.module.state_dict()
    profile = read_snapshot(run_dir / "posthoc_ema" / "step0000007.pt", mmap=False)["profiles"][0]
    for name, value in profile["state_dict"].items():
        torch.testing.assert_close(ema[name], value, rtol=1e-5, atol=1e-6)


def test_opt_in_configs_compose_to_the_same_callback():
    group = compose_train(["callbacks=with_posthoc_ema"]).callbacks
    added = compose_train(["+callback@callbacks.posthoc_ema=posthoc_ema"]).callbacks
    assert group.posthoc_ema == added.posthoc_ema
    assert group.posthoc_ema._target_ == "lightning_diff.callbacks.PosthocEMA"
    assert {"checkpoint", "preemption", "evaluation"} <= set(group)
    assert "posthoc_ema" not in compose_train([]).callbacks  # opt-in


# ---- (iv) resume --------------------------------------------------------------------------------
EXACT = [
    "data=moons",
    "data.num_samples=100",
    "data.batch_size=32",
    "trainer.deterministic=true",
    "callbacks=with_posthoc_ema",
    "callbacks.posthoc_ema.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.evaluation.num_samples=8",
]


class SigtermDuring(L.Callback):
    """Sends SIGTERM to this process during step ``step``: the preemption callback, which comes
    before PosthocEMA in ``callbacks``, saves the checkpoint at the end of that step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(compose_train([*EXACT, "trainer.max_steps=12"], run_dir))
    return run_dir


@pytest.mark.parametrize("stop", ["max_steps", "sigterm"])
def test_a_resumed_run_continues_the_profiles_exactly(tmp_path, straight, stop):
    run_dir = tmp_path / "run"
    if stop == "max_steps":
        overrides = [*EXACT]
        cfg = compose_train([*overrides, "trainer.max_steps=5"], run_dir)
    else:  # last.ckpt is then the preemption callback's, written before PosthocEMA's hook ran
        overrides = [*EXACT, "callbacks.checkpoint.every_n_train_steps=1000"]
        cfg = _add_callback(
            compose_train([*overrides, "trainer.max_steps=12"], run_dir), "sigterm", SigtermDuring, step=5
        )
    _, first = train(cfg)
    assert first["trainer"].global_step == 5
    assert first["stopped_by"] == ("SIGTERM" if stop == "sigterm" else None)
    train(compose_train([*overrides, "trainer.max_steps=12", "resume=auto"], run_dir))
    expected = sorted(p.name for p in (straight / "posthoc_ema").iterdir())
    assert expected == [f"step{s:07d}.pt" for s in (2, 4, 6, 8, 10, 12)]
    # A run that ends at max_steps saves its last step too; one stopped by SIGTERM leaves that to
    # its checkpoint.
    extra = {"step0000005.pt"} if stop == "max_steps" else set()
    assert {p.name for p in (run_dir / "posthoc_ema").iterdir()} == {*expected, *extra}
    for name in expected:
        a = read_snapshot(straight / "posthoc_ema" / name, mmap=False)
        b = read_snapshot(run_dir / "posthoc_ema" / name, mmap=False)
        assert a["step"] == b["step"]
        for pa, pb in zip(a["profiles"], b["profiles"], strict=True):
            assert pa["state_dict"].keys() == pb["state_dict"].keys()
            for key, value in pa["state_dict"].items():
                assert torch.equal(value, pb["state_dict"][key]), (name, key)
    sa, sb = (
        read_checkpoint(d / "checkpoints" / "last.ckpt")["callbacks"]["PosthocEMA"]
        for d in (straight, run_dir)
    )
    assert sa["step"] == sb["step"] == 12
    for pa, pb in zip(sa["profiles"], sb["profiles"], strict=True):
        assert all(torch.equal(v, pb[k]) for k, v in pa.items())


def test_resume_with_other_widths_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_train([*EXACT, "trainer.max_steps=2"], run_dir))
    cfg = compose_train(
        [*EXACT, "trainer.max_steps=4", "resume=auto", "callbacks.posthoc_ema.sigma_rels=[0.05]"], run_dir
    )
    with pytest.raises(ConfigError, match="sigma_rels"):
        train(cfg)


# ---- (v) bad input ------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "lightning_diff.cli.posthoc_ema", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_cli_without_snapshots_or_with_a_bad_width_says_so_in_one_line(phema_run, tmp_path):
    ckpt = phema_run[0] / "checkpoints" / "last.ckpt"
    out = tmp_path / "e.ckpt"
    empty = run_cli(f"ckpt={ckpt}", f"out={out}", f"snapshots={tmp_path / 'none'}")
    assert "no post-hoc EMA snapshots" in _one_error_line(empty)
    wide = run_cli(f"ckpt={ckpt}", f"out={out}", "sigma_rel=0.5")
    assert "sigma_rel=0.5 is out of range" in _one_error_line(wide)
    assert not out.exists()


def test_errors_name_the_problem(phema_run, tmp_path):
    run_dir = phema_run[0]
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ckpt["lightning_diff"]["run_dir"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.ckpt"  # outside any run directory, recording one without snapshots
    torch.save(ckpt, moved)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots in"):
        posthoc_ema(compose_named("posthoc_ema", [f"ckpt={moved}"]))
    for bad in (0.0, -0.1, 0.31, math.inf):
        with pytest.raises(ConfigError, match="out of range"):
            sigma_rel_to_gamma(bad)
    with pytest.raises(ConfigError, match="out of range"):
        PosthocEMA(tmp_path, sigma_rels=[0.05, 0.4])
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="input checkpoint"):
        posthoc_ema(compose_named("posthoc_ema", [f"ckpt={last}", f"out={last}"]))


# ---- DDP ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_write_the_snapshots_of_one(tmp_path):
    base = [*EXACT[:4], "data.num_samples=400", *EXACT[4:], "trainer.max_steps=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(compose_train(base, one))
    train(compose_train([*base, "trainer.devices=2", "trainer.strategy=ddp_spawn"], two))
    names = sorted(p.name for p in (one / "posthoc_ema").iterdir())
    assert (
        names
        == sorted(p.name for p in (two / "posthoc_ema").iterdir())
        == [f"step{s:07d}.pt" for s in (2, 4, 6)]
    )
    for name in names:
        a, b = (read_snapshot(d / "posthoc_ema" / name, mmap=False) for d in (one, two))
        for pa, pb in zip(a["profiles"], b["profiles"], strict=True):
            for key, value in pa["state_dict"].items():
                torch.testing.assert_close(pb["state_dict"][key], value, rtol=1e-4, atol=1e-5)
