"""The command line: ``ld-train`` (:mod:`.train`), ``ld-sample`` (:mod:`.sample`), ``ld-eval``
(:mod:`.evaluate`) and ``ld-compare`` (:mod:`.compare`), and what they share: the config root,
one-line errors and device selection."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException

from lightning_diff.errors import LightningDiffError

log = logging.getLogger("lightning_diff")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report user errors (bad config, missing or corrupt files, a NaN loss) as one line and exit 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LightningDiffError, FloatingPointError, InstantiationException) as err:
            cause = user_error(err)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def user_error(err: BaseException) -> BaseException | None:
    """The user's error behind ``err``: Hydra wraps exceptions raised while instantiating objects."""
    while err is not None:
        if isinstance(err, (LightningDiffError, FloatingPointError)):
            return err
        err = err.__cause__
    return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The Hydra config root (``conf/`` beside the package in a source checkout or editable install).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
