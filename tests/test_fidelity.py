"""torch-fidelity exercised offline: Inception weights from a file that the test makes itself."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diff.errors import ConfigError
from lightning_diff.metrics.fidelity import NAMES, UInt8Images, inception_metrics, save_random_inception


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised (He init, not degenerate) TF-compatible Inception-v3, saved."""
    return save_random_inception(tmp_path_factory.mktemp("weights") / "inception_random.pth")


def test_images_are_quantised_and_grey_is_repeated():
    ds = UInt8Images(torch.tensor([[[[-1.0, 1.0]]]]))
    img = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 1, 2)
    assert img[:, 0, 0].tolist() == [0, 0, 0] and img[:, 0, 1].tolist() == [255, 255, 255]


def test_fid_and_kid_through_torch_fidelity_with_a_local_weights_file(random_inception_weights, tmp_path):
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(12, 1, 8, 8, generator=gen) * 2 - 1
    shifted = (reference * 0.2 + 0.7).clamp(-1, 1)
    kwargs = dict(
        weights_path=random_inception_weights, cache_dir=tmp_path, reference_name="unit", kid_subsets=10
    )
    same = inception_metrics(reference, reference, **kwargs)
    other = inception_metrics(shifted, reference, **kwargs)
    assert abs(same["fid_inception"]) < 1e-3
    assert other["fid_inception"] > 1e-2 > same["fid_inception"]
    assert set(same) == {"fid_inception", "kid_inception_mean", "kid_inception_std"}
    assert all(math.isfinite(v) for v in [*same.values(), *other.values()])
    assert other["kid_inception_mean"] > same["kid_inception_mean"] + 1e-6
    assert list(tmp_path.rglob("*unit*")), "reference statistics were not cached"


def test_missing_weights_file_is_a_config_error(tmp_path):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="weights_path"):
        inception_metrics(x, x, weights_path=tmp_path / "none.pth", cache_dir=tmp_path, reference_name="r")


def test_every_inception_metric_equals_torch_fidelity_s_own_call(random_inception_weights, tmp_path):
    """InceptionMetrics fed in two batches, then again from its cache, gives torch_fidelity.calculate_metrics'
    numbers on the same images (Inception pool features for precision/recall too)."""
    import torch_fidelity

    from lightning_diff.metrics.fidelity import InceptionMetrics

    gen = torch.Generator().manual_seed(1)
    reference = torch.rand(12, 3, 8, 8, generator=gen) * 2 - 1
    generated = (reference[:11] * 0.5 + 0.2).clamp(-1, 1)
    options = {"kid_subsets": 10, "kid_subset_size": 11, "isc_splits": 3}
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated),
        input2=UInt8Images(reference),
        cuda=False,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(random_inception_weights),
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        samples_shuffle=False,
        save_cpu_ram=True,
        verbose=False,
        **options,
    )
    for attempt in ("computed", "cached"):
        metric = InceptionMetrics(
            reference,
            "oracle",
            isc=True,
            prc=True,
            weights_path=random_inception_weights,
            cache_dir=tmp_path,
            **options,
        )
        for batch in generated.tensor_split(2):
            metric.update(batch)
        ours = metric.compute()
        assert len(ours) == 8, attempt
        for theirs_key, ours_key in NAMES.items():
            assert ours[ours_key] == pytest.approx(theirs[theirs_key], rel=1e-6, abs=1e-9), (
                attempt,
                ours_key,
            )
    assert ours["fid_inception"] > 1e-2 and ours["precision_inception"] <= 1


def test_inception_metrics_without_images_or_metrics_are_config_errors(random_inception_weights):
    from lightning_diff.metrics.fidelity import InceptionMetrics

    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="update"):
        InceptionMetrics(x, weights_path=random_inception_weights).compute()
    with pytest.raises(ConfigError, match="computes nothing"):
        InceptionMetrics(x, fid=False, kid=False, weights_path=random_inception_weights)
