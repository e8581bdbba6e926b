"""``ld-eval devices=2`` (two gloo processes sharing sampling, features and the likelihood) writes the
metrics of one process; torch-fidelity's Inception metrics fed from two processes equal one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose_named, compose_train

from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.train import train
from lightning_diff.errors import ConfigError
from lightning_diff.metrics.fidelity import InceptionMetrics, save_random_inception

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    train(compose_train(["data=digits", "data.num_train=40", "trainer.max_steps=3"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def eval_overrides(ckpt, out, devices: int) -> list[str]:
    return [
        f"ckpt={ckpt}",
        "num_samples=11",  # not a multiple of 2: uneven shards
        "num_steps=4",
        "batch_size=4",
        "device=cpu",
        f"devices={devices}",
        "likelihood.enabled=true",
        "likelihood.num_samples=5",
        "likelihood.method=heun",
        "likelihood.num_steps=3",
        f"out={out}",
    ]


def test_eval_on_two_processes_writes_the_metrics_of_one(ckpt, tmp_path):
    one = evaluate(compose_named("eval", eval_overrides(ckpt, tmp_path / "one.json", 1)))
    wandb = ["wandb.enabled=true", "wandb.mode=offline"]  # the table's rows are a collective: no hang
    two = evaluate(compose_named("eval", eval_overrides(ckpt, tmp_path / "two.json", 2) + wandb))
    written = json.loads((tmp_path / "two.json").read_text())
    assert written["devices"] == 2 and written["num_samples"] == 11
    assert two.keys() == one.keys()
    assert {"bits_per_dim", "fd_digits_cnn", "kid_digits_cnn_mean", "sliced_wasserstein"} <= one.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
        assert written[f"eval/{key}"] == pytest.approx(two[key], nan_ok=True), key
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs
    assert (tmp_path / "eval" / "nn_histograms_ld_eval.png").is_file()


def test_samples_file_on_two_processes_scores_like_one(ckpt, tmp_path):
    from lightning_diff.cli.sample import sample

    path = tmp_path / "s.npy"
    sample(compose_named("sample", [f"ckpt={ckpt}", "num_samples=9", "num_steps=3", f"out={path}"]))
    common = [f"samples={path}", "data=digits", "data.num_train=40", "device=cpu"]
    one = evaluate(compose_named("eval", [*common, "devices=1", f"out={tmp_path / 'one.json'}"]))
    two = evaluate(compose_named("eval", [*common, "devices=2", f"out={tmp_path / 'two.json'}"]))
    assert one == pytest.approx(two, rel=1e-5, abs=1e-7, nan_ok=True)


@pytest.mark.parametrize("devices", [0, "two"])
def test_bad_device_count_is_a_config_error(ckpt, tmp_path, devices):
    with pytest.raises(ConfigError, match="devices="):
        evaluate(compose_named("eval", [f"ckpt={ckpt}", f"devices={devices}", f"out={tmp_path / 'm.json'}"]))


def images(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def inception_values(weights, cache, rank: int, world_size: int) -> dict[str, float]:
    """Inception metrics of 9 images against 10, this rank feeding its contiguous block in two batches."""
    reference, generated = images(0, 10), (images(0, 9) * 0.5 + 0.3).clamp(-1, 1)
    options = {"kid_subsets": 5, "isc_splits": 3, "weights_path": weights, "cache_dir": cache}
    metric = InceptionMetrics(reference, "unit", isc=True, prc=True, **options)
    mine = generated.tensor_split(world_size)[rank]
    for batch in mine.tensor_split(2):
        metric.update(batch)
    return metric.compute()


def inception_worker(rank: int, init_file: str, weights, cache, out_dir: str, fail: bool = False) -> None:
    """Each rank's values, and how often it scored against the reference (rank 0 alone should). With
    ``fail``, rank 0's scoring raises: every rank should raise its error, none wait forever."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    scored = []
    original = InceptionMetrics._score

    def counted(self):
        scored.append(rank)
        if fail:
            raise ConfigError("the reference is broken: fix it")
        return original(self)

    InceptionMetrics._score = counted
    try:
        values = inception_values(weights, cache, rank, 2)
    except ConfigError as error:
        values = {"error": str(error)}
    finally:
        InceptionMetrics._score = original
        dist.destroy_process_group()
    torch.save({"values": values, "scored": len(scored)}, f"{out_dir}/rank{rank}.pt")


def test_inception_metrics_fed_by_two_processes_equal_one(tmp_path):
    weights = save_random_inception(tmp_path / "inception.pth")
    single = inception_values(weights, tmp_path / "cache1", 0, 1)
    assert {"fid_inception", "kid_inception_mean", "isc_inception_mean", "precision_inception"} <= set(single)
    assert all(value == value for value in single.values())  # no NaN
    mp.spawn(
        inception_worker, args=(str(tmp_path / "init"), weights, tmp_path / "cache2", str(tmp_path)), nprocs=2
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # Rank 0 scores (the reference is featurised once) and every rank returns its numbers.
    assert [r["scored"] for r in results] == [1, 0]
    assert results[0]["values"] == results[1]["values"]
    # Features of the same image in another batch differ in the last bits: KID's spread of
    # 5 subsets (1.8e-4) moves by 2e-7.
    assert results[0]["values"] == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_an_error_while_rank_0_scores_is_raised_on_every_rank(tmp_path):
    weights = save_random_inception(tmp_path / "inception.pth")
    args = (str(tmp_path / "init"), weights, tmp_path / "cache", str(tmp_path), True)
    mp.spawn(inception_worker, args=args, nprocs=2)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [r["values"] for r in results] == [{"error": "the reference is broken: fix it"}] * 2
    assert [r["scored"] for r in results] == [1, 0]


def test_fewer_samples_than_processes_is_a_config_error(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="num_samples=1 is too few for devices=2: give num_samples=2"):
        evaluate(
            compose_named(
                "eval", [f"ckpt={ckpt}", "devices=2", "num_samples=1", f"out={tmp_path / 'm.json'}"]
            )
        )


@pytest.mark.parametrize(("rows", "devices"), [(1, 1), (2, 3)])
def test_a_samples_file_with_too_few_samples_is_a_config_error(tmp_path, rows, devices):
    import numpy as np

    path = tmp_path / "few.npy"
    np.save(path, np.zeros((rows, 1, 8, 8), np.float32))
    common = [f"samples={path}", "data=digits", "data.num_train=40", "device=cpu", f"devices={devices}"]
    least = max(2, devices)
    with pytest.raises(
        ConfigError, match=f"holds {rows} sample.s.: evaluating on {devices} process.es. needs {least}"
    ):
        evaluate(compose_named("eval", [*common, f"out={tmp_path / 'm.json'}"]))
