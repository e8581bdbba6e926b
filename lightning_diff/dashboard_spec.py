"""The project's wandb dashboard as code: a workspace (a saved view of the project) or a report.

Built with ``wandb_workspaces`` (the ``dashboard`` extra, imported only when a dashboard is built)
from the metric keys the project logs; ``ld-dashboard`` (:mod:`lightning_diff.cli.dashboard`) is the
command. Four sections, each one question of the project:

``loss``
    ``train/loss`` and ``val/loss`` (the models' ``training_step`` and ``validation_step``) against
    ``trainer/global_step`` (the step Lightning's wandb logger logs beside every scalar), one curve
    per wandb run group (``<data>-<family>`` unless set, :func:`lightning_diff.loggers.run_labels`)
    with its min-max band.
``frontier``
    The memorization frontier (``sweeps/memorization.yaml``, ``sweeps/kernel_fit_sigma.yaml``): one
    point per run, held-out quality ``eval/fd_<space>_vs_heldout`` against the data-copying statistic
    ``eval/data_copying_ct`` (below -3: copying), the same plot ``ld-compare`` draws offline as
    ``frontier.png``; beside it copying against the training-set size (config ``data.num_train``)
    and each run's held-out FD next to its floor (``..._floor``: training data scored the same way,
    what exact samples would reach).
``nfe``
    Sampler sweeps (``sweeps/sampler_steps.yaml``, ``teleport_skip.yaml``, ``teleport_plain.yaml``,
    all ``ld-eval`` runs): held-out FD against ``eval/nfe``, the model evaluations the sampler spent
    (teleportation's skipped steps are not counted), and against config ``sampler.skip_fraction``.
``deviation``
    :class:`~lightning_diff.callbacks.GaussianScoreDeviation` (``callbacks=with_deviation``): its
    figure ``eval/score_deviation`` (deviation against sigma at every measured step, log-log), the
    mean over the noise grid ``deviation/<reference>/mean`` against the step, and for each reference
    every noise level's ``deviation/<reference>/sigma_<sigma>`` over training. The noise grid follows
    each run's schedule, so those keys are matched by a pattern, not listed.

Scatter plots read each run's summary (its last logged value), so a run is one point. Offline, the
dashboard is written as the JSON the library would upload (:func:`to_spec`); :func:`read_spec`
parses it back through the library's own model, and :func:`upload` saves either to wandb.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_diff.cli.compare import COPYING_KEY
from lightning_diff.errors import ConfigError

SECTIONS = ("loss", "frontier", "nfe", "deviation")
KINDS = ("workspace", "report")
MODES = ("auto", "online", "offline")
INSTALL_HINT = "pip install 'lightning_diff[dashboard]'"

STEP_KEY = "trainer/global_step"
TRAIN_LOSS_KEY = "train/loss"
VAL_LOSS_KEY = "val/loss"
NFE_KEY = "eval/nfe"
DEVIATION_FIGURE_KEY = "eval/score_deviation"
NUM_TRAIN_CONFIG = "data.num_train"
SKIP_FRACTION_CONFIG = "sampler.skip_fraction"
RUN_GROUP = "Group"  # the wandb run attribute, as wandb_workspaces names it


def heldout_fd_key(feature_space: str) -> str:
    """The held-out Frechet distance in ``feature_space`` (:class:`~lightning_diff.metrics.heldout.
    HeldoutComparison`, under the evaluation's ``eval/`` prefix)."""
    return f"eval/fd_{feature_space}_vs_heldout"


def deviation_mean_key(reference: str) -> str:
    """The deviation from ``reference`` averaged over the noise grid."""
    return f"deviation/{reference}/mean"


def deviation_sigma_pattern(reference: str) -> str:
    """A pattern for the deviation from ``reference`` at each noise level of the grid."""
    return f"^deviation/{re.escape(reference)}/sigma_.*"


def library():
    """``(wandb_workspaces.workspaces, wandb_workspaces.reports.v2)``, or a one-line ConfigError."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ConfigError(f"ld-dashboard needs the wandb-workspaces package: {INSTALL_HINT}") from err
    return ws, wr


def check_options(
    kind: str, sections: Sequence[str], feature_space: str, references: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Validate the options against what the project logs; returns the sections (duplicates dropped)
    and the deviation references (``None``: all of the callback's)."""
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"sections: no section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    if not sections:
        raise ConfigError(f"sections is empty: pick some of {', '.join(SECTIONS)}")
    if "frontier" in sections or "nfe" in sections:
        from lightning_diff.metrics.suite import FEATURE_SPACES

        spaces = [s for s in FEATURE_SPACES if s != "auto"]  # a logged key names the resolved space
        if feature_space not in spaces:
            raise ConfigError(f"feature_space={feature_space!r}: use one of {', '.join(spaces)}")
    if "deviation" not in sections:
        return list(dict.fromkeys(sections)), []
    from lightning_diff.callbacks.gaussian_deviation import REFERENCES

    references = list(REFERENCES if references is None else references)
    if not references or any(r not in REFERENCES for r in references):
        raise ConfigError(f"references={references}: use some of {', '.join(REFERENCES)}")
    return list(dict.fromkeys(sections)), references


@dataclass
class Part:
    """One section: a workspace section, or in a report a heading, a paragraph and a panel grid."""

    title: str
    about: str
    panels: list
    groupby: list[str] = field(default_factory=list)  # the report's run set grouping


def loss_part(wr) -> Part:
    return Part(
        "Loss curves",
        f"{TRAIN_LOSS_KEY} and {VAL_LOSS_KEY} against {STEP_KEY}: the mean of each wandb run group "
        "(default <data>-<family>) with its min-max band.",
        [
            wr.LinePlot(
                title=f"{key} by run group",
                x=STEP_KEY,
                y=[key],
                groupby=RUN_GROUP,
                groupby_aggfunc="mean",
                groupby_rangefunc="minmax",
            )
            for key in (TRAIN_LOSS_KEY, VAL_LOSS_KEY)
        ],
        groupby=["group"],
    )


def frontier_part(wr, fd: str) -> Part:
    return Part(
        "Memorization frontier",
        f"One point per run: held-out quality {fd} (lower is better) against the data-copying "
        f"statistic {COPYING_KEY} (below -3: copying); a model that only gains quality by moving left "
        "is memorizing. ld-compare draws the same frontier offline (frontier.png).",
        [
            wr.ScatterPlot(title=f"{fd} against {COPYING_KEY} (copying below -3)", x=COPYING_KEY, y=fd),
            wr.ScatterPlot(
                title=f"{COPYING_KEY} against training-set size",
                x=wr.Config(NUM_TRAIN_CONFIG),
                y=COPYING_KEY,
                log_x=True,
            ),
            wr.BarPlot(title=f"{fd} beside its floor (training data)", metrics=[fd, f"{fd}_floor"]),
        ],
    )


def nfe_part(wr, fd: str) -> Part:
    return Part(
        "FD against NFE",
        "One point per ld-eval run of the sampler sweeps (sweeps/sampler_steps.yaml, "
        f"teleport_skip.yaml, teleport_plain.yaml): {fd} against the model evaluations spent "
        f"({NFE_KEY}) and against the teleportation skip fraction.",
        [
            wr.ScatterPlot(title=f"{fd} against {NFE_KEY}", x=NFE_KEY, y=fd, log_x=True),
            wr.ScatterPlot(
                title=f"{fd} against {SKIP_FRACTION_CONFIG}", x=wr.Config(SKIP_FRACTION_CONFIG), y=fd
            ),
        ],
    )


def deviation_part(wr, references: Sequence[str]) -> Part:
    return Part(
        "Score deviation",
        "The learned score's deviation 1 - EV(sigma) from reference scores fitted to the training set "
        "(Wang & Vastola 2024; callbacks=with_deviation): deviation against sigma at each measured "
        "step, its mean over the noise grid, and each noise level over training.",
        [
            wr.MediaBrowser(
                title="deviation against sigma", media_keys=[DEVIATION_FIGURE_KEY], gallery_axis="step"
            ),
            wr.LinePlot(
                title="deviation, mean over sigma",
                x=STEP_KEY,
                y=[deviation_mean_key(r) for r in references],
                log_y=True,
            ),
            *(
                wr.LinePlot(
                    title=f"deviation from the {r} score at each sigma",
                    x=STEP_KEY,
                    metric_regex=deviation_sigma_pattern(r),
                    log_y=True,
                )
                for r in references
            ),
        ],
    )


def build_dashboard(
    kind: str = "workspace",
    name: str = "lightning_diff",
    entity: str | None = None,
    project: str = "lightning_diff",
    sections: Sequence[str] = SECTIONS,
    feature_space: str = "digits_cnn",
    references: Sequence[str] | None = None,
):
    """A ``wandb_workspaces`` Workspace or Report with ``sections``, in that order; nothing is sent.

    ``references`` (of the deviation section) defaults to all of the callback's. ``entity`` defaults
    to ``$WANDB_ENTITY``, else it is left empty for :func:`upload` to fill in. A report's run sets
    name no project until :func:`upload` binds them (binding looks the project up on the server).
    """
    ws, wr = library()
    from pydantic import ValidationError

    sections, references = check_options(kind, sections, feature_space, references)
    fd = heldout_fd_key(feature_space)
    make = {
        "loss": lambda: loss_part(wr),
        "frontier": lambda: frontier_part(wr, fd),
        "nfe": lambda: nfe_part(wr, fd),
        "deviation": lambda: deviation_part(wr, references),
    }
    entity = entity or os.environ.get("WANDB_ENTITY") or ""
    try:
        chosen = [make[section]() for section in sections]
        if kind == "workspace":
            return ws.Workspace(
                entity=entity,
                project=project,
                name=name,
                sections=[ws.Section(name=p.title, panels=p.panels, is_open=True) for p in chosen],
            )
        blocks = []
        for p in chosen:
            blocks += [
                wr.H1(p.title),
                wr.P(p.about),
                wr.PanelGrid(runsets=[wr.Runset(name=p.title, groupby=p.groupby)], panels=p.panels),
            ]
        return wr.Report(
            entity=entity,
            project=project,
            title=name,
            description="Built by ld-dashboard from the metric keys lightning_diff logs.",
            blocks=blocks,
        )
    except ValidationError as err:
        raise ConfigError(f"wandb_workspaces refused the {kind}: {err.errors()[0]['msg']}") from err


def kind_of(dashboard) -> str:
    ws, _ = library()
    return "workspace" if isinstance(dashboard, ws.Workspace) else "report"


def to_spec(dashboard) -> dict[str, Any]:
    """``{"kind": ..., "spec": ...}``: the library's wire model of ``dashboard`` (a workspace's view,
    or a report's viewspec) as JSON data, what :func:`upload` would send."""
    model = dashboard._to_model()
    return {
        "kind": kind_of(dashboard),
        "spec": model.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def from_spec(data: dict[str, Any]):
    """The Workspace or Report of a :func:`to_spec` dict, parsed back through the library's model."""
    ws, wr = library()
    from pydantic import ValidationError
    from wandb_workspaces.reports.v2 import internal as report_model
    from wandb_workspaces.workspaces import internal as workspace_model

    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in KINDS or not isinstance(data.get("spec"), dict):
        raise ConfigError("not an ld-dashboard spec: expected a JSON object with 'kind' and 'spec'")
    try:
        if kind == "workspace":
            return ws.Workspace._from_model(workspace_model.View.model_validate(data["spec"]))
        return wr.Report._from_model(report_model.ReportViewspec.model_validate(data["spec"]))
    except ValidationError as err:
        raise ConfigError(
            f"not a valid {kind} spec: {err.errors()[0]['msg']} at {err.errors()[0]['loc']}"
        ) from err


def write_spec(dashboard, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_spec(dashboard), indent=2) + "\n")
    return path


def read_spec(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"from_spec={path}: no such file (write one with ld-dashboard mode=offline out={path})"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"from_spec={path} is not JSON: {err}") from err
    return from_spec(data)


def resolve_mode(mode: str) -> str:
    """``online`` or ``offline``, decided like the project's logger (:func:`lightning_diff.loggers.
    wandb_mode`: ``WANDB_MODE`` wins over ``auto``; ``auto`` is online only with a key and an answer
    from the server within seconds); online needs a key, so nothing ever prompts for one."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    from lightning_diff.loggers import has_wandb_key, wandb_mode

    online = wandb_mode(mode) in ("online", "run")
    if online and not has_wandb_key():
        raise ConfigError(
            "uploading needs a wandb key: set WANDB_API_KEY or run `wandb login`, or write the spec "
            "with mode=offline"
        )
    return "online" if online else "offline"


def upload(dashboard, entity: str | None = None):
    """Save ``dashboard`` to wandb with the library's ``save()`` and return it.

    ``entity`` (else the dashboard's, else ``$WANDB_ENTITY``, else the key's default entity) is
    set on the dashboard and, for a report, on every run set that names no project.
    """
    _, wr = library()
    entity = entity or dashboard.entity or os.environ.get("WANDB_ENTITY")
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    dashboard.entity = entity
    if isinstance(dashboard, wr.Report):
        for block in dashboard.blocks:
            if isinstance(block, wr.PanelGrid):
                for runset in block.runsets:
                    if not runset.project:
                        runset.entity, runset.project = entity, dashboard.project
    return dashboard.save()
