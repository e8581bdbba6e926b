"""torch-fidelity exercised offline: Inception weights from a file that the test makes itself."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diff.errors import ConfigError
from lightning_diff.metrics.fidelity import UInt8Images, inception_metrics, save_random_inception


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
