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

import contextlib
import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

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
EXTRACTOR = "inception-v3-compat"
# torch-fidelity's feature layer of each metric for this extractor.
LAYERS = {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"}


def quantised(images: Tensor) -> Tensor:
    """N x 1 or N x 3 x H x W images in [-1, 1] (or uint8) as uint8, on their device."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"Inception metrics need N x 1 or N x 3 x H x W images, got {tuple(images.shape)}")
    return images if images.dtype == torch.uint8 else to_uint8(images)


class UInt8Images(Dataset):
    """Images in [-1, 1] (or uint8) served as uint8 3 x H x W tensors, as torch-fidelity expects."""

    def __init__(self, images: Tensor):
        self.images = quantised(images.detach().cpu())

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


class InceptionMetrics(Metric):
    """FID, KID, Inception Score and precision/recall of generated images against ``reference``,
    with torch-fidelity's TF-compatible Inception-v3, as a torchmetrics ``Metric``.

    ``update`` turns a batch of generated images (N x C x H x W, in [-1, 1] or uint8) into Inception
    features on the metric's device and keeps them in ``cat`` states; ``compute`` gathers every
    process's features in rank order (so processes that each feed a contiguous block of sample
    indices rebuild the single-process order and every value, KID's random subsets included) and
    scores them with torch-fidelity's own functions. The reference's features and FID statistics
    come from torch-fidelity's cache under ``cache_dir``, keyed by ``reference_name`` and the
    weights file (computed on the first evaluation). Under DDP, rank 0 alone scores the gathered
    features against the reference (so the reference is featurised once, not once per rank) and
    sends the numbers to the other ranks. ``compute`` is a collective: call it on every rank.
    """

    full_state_update = False

    def __init__(
        self,
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
        isc_splits: int = 10,
        verbose: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from torch_fidelity.utils import create_feature_extractor

        if not (fid or kid or isc or prc):
            raise ConfigError("InceptionMetrics with fid, kid, isc and prc all false computes nothing")
        self.enabled = {"fid": fid, "kid": kid, "isc": isc, "prc": prc}
        self.layers = sorted({LAYERS[name] for name, on in self.enabled.items() if on})
        self.reference = UInt8Images(reference)
        self.batch_size = int(batch_size)
        self.options = {
            "kid_subsets": int(kid_subsets),
            "kid_subset_size": int(kid_subset_size),
            "isc_splits": int(isc_splits),
            "verbose": bool(verbose),
        }
        weights_key = _weights_key(weights_path)  # a missing file is a ConfigError before any work
        cache = reference_name is not None and cache_dir is not None
        self.cache_options = {
            "cache": cache,
            "cache_root": str(cache_dir) if cache else None,
            "input2_cache_name": f"{reference_name}-{weights_key}" if cache else None,
        }
        self.extractor = create_feature_extractor(
            EXTRACTOR,
            self.layers,
            cuda=False,
            feature_extractor_weights_path=str(weights_path) if weights_path else None,
            verbose=bool(verbose),
        )
        for layer in self.layers:
            self.add_state(_state(layer), default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        for chunk in quantised(images.detach()).split(self.batch_size):
            chunk = chunk.to(self.device, non_blocking=True)
            if chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            found = self.extractor.convert_features_tuple_to_dict(self.extractor(chunk))
            for layer in self.layers:
                getattr(self, _state(layer)).append(found[layer].float())

    def features(self) -> dict[str, Tensor]:
        """The generated images' features, by layer, gathered (after ``compute``) or local."""
        return {layer: dim_zero_cat(getattr(self, _state(layer))).cpu() for layer in self.layers}

    def _reference_kwargs(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "input2": self.reference,
            "batch_size": self.batch_size,
            "cuda": cuda,
            "save_cpu_ram": True,  # images in memory: no loader workers
            "samples_shuffle": False,
            **self.options,
            **self.cache_options,
        }

    def compute(self) -> dict[str, float]:
        if not self._distributed():
            return self._score()
        # Rank 0 scores; the others wait for its numbers (or its error, raised on every rank).
        group = self.process_group
        message: list = [None]
        if torch.distributed.get_rank(group) == 0:
            try:
                message[0] = ("ok", self._score())
            except Exception as error:  # noqa: BLE001 - re-raised on every rank below
                message[0] = ("error", error)
        device = self.device if torch.distributed.get_backend(group) == "nccl" else None
        src = 0 if group is None else torch.distributed.get_global_rank(group, 0)
        torch.distributed.broadcast_object_list(message, src=src, group=group, device=device)
        status, value = message[0]
        if status == "error":
            raise value
        return value

    def _distributed(self) -> bool:
        return (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(self.process_group) > 1
        )

    def _score(self) -> dict[str, float]:
        from torch_fidelity.metric_fid import (
            fid_featuresdict_to_statistics,
            fid_input_id_to_statistics_cached,
            fid_statistics_to_metric,
        )
        from torch_fidelity.metric_isc import isc_featuresdict_to_metric
        from torch_fidelity.metric_kid import kid_featuresdict_to_metric
        from torch_fidelity.metric_prc import prc_featuresdict_to_metric
        from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

        if len(getattr(self, _state(self.layers[0]))) == 0:  # a list, or a tensor once synced
            raise ConfigError("Inception metrics of no images: feed generated images to update() first")
        generated = self.features()
        kw = self._reference_kwargs()
        subset = min(kw["kid_subset_size"], len(generated[self.layers[0]]), len(self.reference))
        kw["kid_subset_size"] = subset
        device = torch.cuda.device(self.device) if kw["cuda"] else contextlib.nullcontext()
        out: dict[str, float] = {}
        with device:  # torch-fidelity moves reference batches to the current CUDA device
            reference = None
            if self.enabled["kid"] or self.enabled["prc"]:
                reference = extract_featuresdict_from_input_id_cached(2, self.extractor, **kw)
            if self.enabled["isc"]:
                out.update(isc_featuresdict_to_metric(generated, LAYERS["isc"], **kw))
            if self.enabled["fid"]:
                mine = fid_featuresdict_to_statistics(generated, LAYERS["fid"])
                theirs = fid_input_id_to_statistics_cached(2, self.extractor, LAYERS["fid"], **kw)
                out.update(fid_statistics_to_metric(mine, theirs, kw["verbose"]))
            if self.enabled["kid"]:
                out.update(kid_featuresdict_to_metric(generated, reference, LAYERS["kid"], **kw))
            if self.enabled["prc"]:
                out.update(prc_featuresdict_to_metric(generated, reference, LAYERS["prc"], **kw))
        return {NAMES[k]: float(v) for k, v in out.items() if k in NAMES}


def _state(layer: str) -> str:
    return f"features_{layer}"


def inception_metrics(
    samples: Tensor,
    reference: Tensor,
    reference_name: str | None = None,
    device: str = "auto",
    **options,
) -> dict[str, float]:
    """Compare ``samples`` with ``reference`` (both N x C x H x W, in [-1, 1] or uint8) in Inception
    space, in one process: :class:`InceptionMetrics` fed every sample. ``device="auto"``: CUDA when
    available."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    metric = InceptionMetrics(reference, reference_name, **options).to(device)
    metric.update(samples)
    return metric.compute()


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
