"""Inception-v3 metrics through torch-fidelity: FID, KID, Inception Score, precision and recall.

torch-fidelity carries the TF-compatible Inception-v3 of the reference FID code (resizing like
TensorFlow, features of the 2048-d pool layer). Images are quantised to uint8 before features
(the FID convention) and grey images are repeated to three channels. Weights come from
torch-fidelity's usual download, or from a local file (``weights_path``) on machines without
internet. Reference statistics are cached on disk by torch-fidelity under ``cache_dir``, keyed by
``reference_name`` (data set, subset, seed) and the weights file, so the training set is
featurised once.

All returned names carry the feature space (``NAMES``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_diff.errors import ConfigError
from lightning_diff.plotting import to_uint8

# torch-fidelity's result keys -> ours, with the feature space in each name.
NAMES = {
    "frechet_inception_distance": "fid_inception",
    "kernel_inception_distance_mean": "kid_inception_mean",
    "kernel_inception_distance_std": "kid_inception_std",
    "inception_score_mean": "isc_inception_mean",
    "inception_score_std": "isc_inception_std",
    "precision": "precision_inception",
    "recall": "recall_inception",
    "f_score": "f_score_inception",
}


class UInt8Images(Dataset):
    """Images in [-1, 1] (or uint8) served as uint8 3 x H x W tensors, as torch-fidelity expects."""

    def __init__(self, images: Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(
                f"Inception metrics need N x 1 or N x 3 x H x W images, got {tuple(images.shape)}"
            )
        self.images = images if images.dtype == torch.uint8 else to_uint8(images.detach().cpu())

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        img = self.images[i]
        return img.expand(3, *img.shape[1:]) if img.shape[0] == 1 else img


def _weights_key(weights_path: str | Path | None) -> str:
    if weights_path is None:
        return "default"
    path = Path(weights_path)
    if not path.is_file():
        raise ConfigError(
            f"Inception weights {path} not found: give inception.weights_path=FILE (a torch-fidelity "
            "Inception-v3 state dict; ld-eval: eval.inception.weights_path, ld-train: "
            "callbacks.evaluation.inception.weights_path) or leave it null to download"
        )
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def inception_metrics(
    samples: Tensor,
    reference: Tensor,
    reference_name: str | None = None,
    fid: bool = True,
    kid: bool = True,
    isc: bool = False,
    prc: bool = False,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: str = "auto",
    verbose: bool = False,
) -> dict[str, float]:
    """Compare ``samples`` with ``reference`` (both N x C x H x W, in [-1, 1] or uint8) in Inception space."""
    import torch_fidelity

    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    cache = reference_name is not None and cache_dir is not None
    subset = min(kid_subset_size, len(samples), len(reference))
    out = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples),
        input2=UInt8Images(reference),
        cuda=cuda,
        batch_size=batch_size,
        fid=fid,
        kid=kid,
        isc=isc,
        prc=prc,
        kid_subsets=kid_subsets,
        kid_subset_size=subset,
        feature_extractor_weights_path=str(weights_path) if weights_path else None,
        cache=cache,
        cache_root=str(cache_dir) if cache_dir else None,
        input2_cache_name=f"{reference_name}-{_weights_key(weights_path)}" if cache else None,
        samples_shuffle=False,
        verbose=verbose,
    )
    return {NAMES[k]: float(v) for k, v in out.items() if k in NAMES}


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Save torch-fidelity's TF-compatible Inception-v3 with random weights as a state dict that
    ``weights_path`` loads: for running and timing the pipeline where nothing can be downloaded (its
    features, and so its FID, mean nothing). Convolutions get He initialisation, which keeps the
    activations at unit scale through the ~50 ReLU layers (PyTorch's default shrinks them until every
    feature is ~0)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.stem + ".empty.pth")
    torch.save({}, empty)
    # Build the network without loading anything into it: its layers keep their initialisation.
    original = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state_dict, *a, **k: None
    try:
        torch.manual_seed(seed)
        net = fe.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
        )
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = original
        empty.unlink(missing_ok=True)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path
