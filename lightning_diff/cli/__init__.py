"""The command line: ``ld-train`` (:mod:`.train`), ``ld-sample`` (:mod:`.sample`), ``ld-eval``
(:mod:`.evaluate`), ``ld-compare`` (:mod:`.compare`), ``ld-tv`` (:mod:`.tv`) and ``ld-dashboard``
(:mod:`.dashboard`), and what they share: the config root, one-line errors, the notices hidden
while they run, and device selection."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from torch.multiprocessing import ProcessRaisedException

from lightning_diff.errors import LightningDiffError

log = logging.getLogger("lightning_diff")


# What a user's error arrives as: itself, wrapped by Hydra's instantiate, or from a spawned process.
USER_ERROR_CARRIERS = (LightningDiffError, FloatingPointError, InstantiationException, ProcessRaisedException)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report user errors (bad config, missing or corrupt files, a NaN loss) as one line and exit 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERROR_CARRIERS as err:
            cause = user_error(err)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# The hydra/launcher options that hydra-submitit-launcher provides: its own and conf/hydra/launcher/'s.
SUBMITIT_LAUNCHERS = ("submitit_slurm", "submitit_local", "slurm", "slurm_local")


def missing_launcher_plugin(overrides: list[str]) -> str | None:
    """The error for a ``hydra/launcher=`` override whose plugin is not installed, or None.

    Hydra itself stops while composing the config, before :func:`one_line_errors` can see it, with
    several lines of search paths that do not name the package to install.
    """
    for item in overrides:
        key, _, name = item.partition("=")
        if key.lstrip("+") == "hydra/launcher" and name in SUBMITIT_LAUNCHERS and not _has_submitit_plugin():
            return f"hydra/launcher={name} needs pip install 'lightning_diff[slurm]'"
    return None


def _has_submitit_plugin() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no Hydra plugin at all: no hydra_plugins namespace package
        return False


def launcher_plugin_required(main: Callable[..., Any]) -> Callable[..., Any]:
    """Outside ``@hydra.main``: check the command line's launcher choice before Hydra composes."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not args and not kwargs:  # from the command line (tests pass a config instead)
            message = missing_launcher_plugin(sys.argv[1:])
            if message is not None:
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)
        return main(*args, **kwargs)

    return wrapper


#: Packages whose deprecation notices are theirs to act on, not our users': hidden at entry points.
THIRD_PARTY = (
    r"(lightning|lightning_fabric|lightning_utilities|pytorch_lightning|torch|torchvision|torchmetrics"
    r"|torch_fidelity|wandb|hydra|omegaconf|pydantic|sklearn|scipy|matplotlib|PIL|numpy)(\.|$)"
)
#: Lightning's rank-zero loggers, which print its hosted-logger advert at every Trainer.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


@contextlib.contextmanager
def third_party_notices_hidden():
    """While an entry point runs: hide deprecation and future warnings raised inside the libraries
    it calls (:data:`THIRD_PARTY`) and Lightning's litlogger advert. Our own warnings, and every other
    warning of those libraries, still show; the warning filters and loggers are restored afterwards,
    so importing ``lightning_diff`` (or calling its functions) changes nothing."""
    advert = _DropAdverts()
    loggers = [logging.getLogger(name) for name in RANK_ZERO_LOGGERS]
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
        for logger in loggers:
            logger.addFilter(advert)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(advert)


def entry_point(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The wrapper of every command: :func:`one_line_errors` and :func:`third_party_notices_hidden`."""
    guarded = one_line_errors(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with third_party_notices_hidden():
            return guarded(*args, **kwargs)

    return wrapper


def user_error(err: BaseException) -> BaseException | None:
    """The user's error behind ``err``: Hydra wraps exceptions raised while instantiating objects, and
    a process started by ``ddp_spawn`` hands its error back as the text of its traceback."""
    while err is not None:
        if isinstance(err, (LightningDiffError, FloatingPointError)):
            return err
        if isinstance(err, ProcessRaisedException):
            return _spawned_user_error(str(err))
        err = err.__cause__
    return None


def _spawned_user_error(traceback_text: str) -> BaseException | None:
    """The user's error that ends a spawned process's traceback (its last line is ``module.Class:
    message``), rebuilt; None for any other error."""
    from lightning_diff import errors

    last = traceback_text.rstrip().rsplit("\n", 1)[-1]
    name, _, message = last.partition(": ")
    if name == "FloatingPointError":
        return FloatingPointError(message)
    module, _, cls = name.rpartition(".")
    found = getattr(errors, cls, None) if module == errors.__name__ else None
    if isinstance(found, type) and issubclass(found, LightningDiffError):
        return found(message)
    return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The Hydra config root (``conf/`` beside the package in a source checkout or editable install).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
