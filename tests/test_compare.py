"""ld-compare: differing config keys, final metrics and curves of real run directories, offline."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lightning_diff.cli.compare import flatten, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from conftest import compose_train

    from lightning_diff.cli.train import train

    base = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (1, 2):
        run_dir = base / f"seed{seed}"
        train(compose_train(["data=moons", f"seed={seed}", "model.optimizer.lr=0.001"], run_dir))
        runs.append(run_dir)
    return runs


def test_compare_lists_differing_keys_metrics_and_plots_curves(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    main([str(p) for p in two_runs] + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert "compare.md" in printed

    table = (out / "compare.md").read_text()
    config_part, metrics_part = table.split("## Final metrics")
    assert "| key | seed1 | seed2 |" in config_part
    assert "| seed | 1 | 2 |" in config_part
    assert "| data.seed | 1 | 2 |" in config_part
    assert "model.optimizer.lr" not in config_part  # the same in both runs
    assert "callbacks.checkpoint.dirpath" not in config_part  # inside each run's own directory
    for name in ("train/loss", "val/loss", "eval/sliced_wasserstein", "step"):
        assert f"| {name} |" in metrics_part

    with open(out / "compare.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["section", "key", "seed1", "seed2"]
    by_key = {(r[0], r[1]): r[2:] for r in rows[1:]}
    assert by_key[("config", "seed")] == ["1", "2"]
    assert [float(v) for v in by_key[("metric", "step")]] == [6.0, 6.0]
    loss = [float(v) for v in by_key[("metric", "train/loss")]]
    assert all(0 < v < 10 for v in loss) and loss[0] != loss[1]

    for name in ("train_loss.png", "val_loss.png"):
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_compare_plots_only_the_chosen_metrics(two_runs, tmp_path):
    out = tmp_path / "cmp"
    main([str(p) for p in two_runs] + ["--metrics", "val/loss", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.png") if p.name != "frontier.png") == ["val_loss.png"]


def test_frontier_has_a_point_per_run_that_reports_both_axes(two_runs, tmp_path):
    import json
    import shutil

    from lightning_diff.cli.compare import compare, load_run, plot_frontier

    copies = []
    for i, run in enumerate(two_runs):
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        metrics = json.loads((copy / "metrics.json").read_text())
        metrics.update({"eval/data_copying_ct": -4.0 + 3 * i, "eval/fd_raw_vs_heldout": 1.0 - 0.5 * i})
        metrics.update(
            {"eval/fd_raw_vs_heldout_ci_low": 0.5 - 0.5 * i, "eval/fd_raw_vs_heldout_ci_high": 1.5}
        )
        (copy / "metrics.json").write_text(json.dumps(metrics))
        copies.append(copy)
    result = compare(copies, tmp_path / "cmp")
    assert result["frontier"] == tmp_path / "cmp" / "frontier.png"
    with Image.open(result["frontier"]) as image:
        assert image.format == "PNG" and image.size[0] > 100
    # A run without the copying statistic gives no point; with no point there is no figure.
    metrics = json.loads((copies[0] / "metrics.json").read_text())
    del metrics["eval/data_copying_ct"]
    (copies[0] / "metrics.json").write_text(json.dumps(metrics))
    runs = [load_run(copies[0])]
    assert plot_frontier(tmp_path / "none.png", runs) is None and not (tmp_path / "none.png").exists()


def test_unknown_metric_is_one_line_error(two_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(two_runs[0]), "--metrics", "train/nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: metric train/nope is in no run's csv/metrics.csv") and "\n" not in err


def test_missing_run_directory_is_one_line_error_from_the_module(two_runs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_diff.cli.compare", str(two_runs[0]), str(tmp_path / "absent")]
        + ["--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    absent = tmp_path / "absent"
    assert lines == [f"error: run directory {absent} does not exist: pass directories written by ld-train"]
    assert not (tmp_path / "o").exists()


def test_directory_without_config_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'empty'} has no config.yaml: pass run directories written by ld-train"


def test_console_script_and_flatten():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert 'ld-compare = "lightning_diff.cli.compare:main"' in scripts.splitlines()
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": {}}) == {
        "a.b": 1,
        "a.c.d": None,
        "e": [1, 2],
        "f": {},
    }
