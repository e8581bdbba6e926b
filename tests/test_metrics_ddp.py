"""Every metric gives the same value with two gloo processes, each fed half the samples, as with one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_diff.metrics import (
    MMD,
    DataCopying,
    DataLogLikelihood,
    FrechetDistance,
    HeldoutComparison,
    HistogramTV,
    KernelDistance,
    Memorization,
    SlicedWasserstein,
)

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(301, 6, generator=g)
    fake = torch.randn(257, 6, generator=g) * 1.2 + 0.3
    # A few near-copies so that the memorization statistics are not all zero.
    fake[:20] = train[:20] + 1e-3 * torch.randn(20, 6, generator=g)
    heldout = torch.randn(160, 6, generator=g)
    return {"train": train, "fake": fake, "heldout": heldout}


def log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x.pow(2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def evaluate(data: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, object]:
    """Build every metric, feed this rank's contiguous share (in two batches), compute on every rank."""
    train, fake = data["train"], data["fake"]

    def share(x: torch.Tensor) -> list[torch.Tensor]:
        mine = x.tensor_split(world_size)[rank]
        return list(mine.tensor_split(2))

    fd = FrechetDistance(feature_dim=6)
    kid = KernelDistance(subsets=10, subset_size=100)
    for batch in share(train):
        fd.update(batch, real=True)
        kid.update(batch, real=True)
    for batch in share(fake):
        fd.update(batch, real=False)
        kid.update(batch, real=False)
    out: dict[str, object] = {"fd": fd.compute(), "kid": torch.stack(kid.compute())}
    stats = fd.reference_stats()
    out["ref_mean"], out["ref_cov"], out["ref_n"] = stats.mean, stats.cov, stats.n

    # The full training statistics loaded on every rank must not be counted once per rank.
    cached = FrechetDistance(feature_dim=6)
    cached.set_reference(train.double().mean(0), torch.cov(train.double().T), len(train))
    # Real statistics kept across reset() stay per-rank partial sums, reduced again in compute().
    kept = FrechetDistance(feature_dim=6, reset_real_features=False)
    for batch in share(train):
        kept.update(batch, real=True)
    kept.update(fake[:10], real=False)
    kept.compute()
    kept.reset()

    memorization = Memorization(train, chunk_size=32, extraction_delta=0.01, heldout=data["heldout"])
    copying = DataCopying(train, data["heldout"], num_cells=3, min_cell_samples=10, chunk_size=32)
    heldout = HeldoutComparison(train, data["heldout"], bootstrap=20, chunk_size=32)
    vector = {
        "sw": SlicedWasserstein(train),
        "mmd": MMD(train),
        "tv": HistogramTV(train, bins=8),
        "log_lik": DataLogLikelihood(log_prob),
    }
    for batch in share(fake):
        cached.update(batch, real=False)
        kept.update(batch, real=False)
        for metric in (memorization, copying, heldout, *vector.values()):
            metric.update(batch)
    out["fd_cached"], out["fd_kept"] = cached.compute(), kept.compute()
    out.update({f"mem_{k}": v for k, v in memorization.compute().items()})
    out["mem_pairs"] = torch.stack(memorization.pairs(25))
    hists = memorization.histograms(bins=12)
    out["mem_hist"] = torch.as_tensor(hists["nn1"][0])
    out["mem_hist_heldout"] = torch.as_tensor(hists["nn1_heldout"][0])
    out.update({f"copying_{k}": v for k, v in copying.compute().items()})
    out["copying_cells_z"] = torch.as_tensor(copying.cells()["z"])
    out.update({f"heldout_{k}": v for k, v in heldout.compute().items()})
    out.update({name: metric.compute() for name, metric in vector.items()})
    return out


def worker(rank: int, init_file: str, out_dir: str, data: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(evaluate(data, rank, WORLD_SIZE), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_metrics_agree_with_two_processes(tmp_path):
    data = make_data()
    single = evaluate(data, rank=0, world_size=1)
    assert float(single["mem_memorized_fraction"]) > 0 and float(single["mem_extracted_count"]) == 20
    assert (
        math.isfinite(float(single["copying_data_copying_ct"]))
        and float(single["copying_data_copying_cells"]) >= 2
    )
    assert float(single["heldout_heldout_compared"]) == 160
    torch.testing.assert_close(single["fd_cached"], single["fd"])
    torch.testing.assert_close(single["fd_kept"], single["fd"])
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), data), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result.keys() == single.keys()
        for key, expected in single.items():
            if isinstance(expected, torch.Tensor):
                torch.testing.assert_close(result[key], expected, rtol=1e-9, atol=1e-12, msg=key)
            else:
                assert result[key] == expected, key
