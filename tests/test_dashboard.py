"""ld-dashboard: the wandb workspace (or report) as code, built, written and read back offline.

Nothing here reaches a server: an autouse fixture makes every socket connection in this process fail
the test, and the command's subprocesses run without a key or ``WANDB_MODE``, so ``mode=auto``
decides offline without probing.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch.loggers.wandb as lightning_wandb
import matplotlib
import pytest
from conftest import compose_named

from lightning_diff import dashboard_spec as dash
from lightning_diff import loggers
from lightning_diff.cli.dashboard import dashboard
from lightning_diff.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_diff"

SECTION_TITLES = ["Loss curves", "Memorization frontier", "FD against NFE", "Score deviation"]
LINE, SCATTER, BAR, MEDIA = "Run History Line Plot", "Scatter Plot", "Bar Chart", "Media Browser"
PANEL_KINDS = {
    "Loss curves": [LINE, LINE],
    "Memorization frontier": [SCATTER, SCATTER, BAR],
    "FD against NFE": [SCATTER, SCATTER],
    "Score deviation": [MEDIA, LINE, LINE, LINE, LINE],
}
FD = "eval/fd_digits_cnn_vs_heldout"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dashboard tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    """No wandb key anywhere (``$HOME/.netrc`` included), no ``WANDB_MODE`` or ``WANDB_ENTITY``."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture
def online(no_key, monkeypatch):
    """A key and a server that answers (the probe is faked; nothing connects)."""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(loggers, "reachable", lambda *args, **kwargs: True)


def command(args: list[str], home: Path, *, prelude: str = "") -> subprocess.CompletedProcess:
    """Run ``ld-dashboard args`` in a subprocess with no wandb key, mode or entity in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY")}
    # A fresh HOME hides any ~/.netrc key; matplotlib keeps its font cache where it already is.
    env.update(HOME=str(home), OMP_NUM_THREADS="1", MPLCONFIGDIR=matplotlib.get_configdir())
    script = f"{prelude}\nimport sys\nsys.argv = ['ld-dashboard', *{args!r}]\n"
    script += "from lightning_diff.cli.dashboard import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=home)


def compose(overrides: list[str]):
    return compose_named("dashboard", overrides)


def workspace_sections(spec: dict) -> dict[str, list[dict]]:
    """Section name -> its panels, from a workspace spec in the library's wire format."""
    assert spec["kind"] == "workspace"
    sections = spec["spec"]["spec"]["section"]["panelBankConfig"]["sections"]
    return {s["name"]: s["panels"] for s in sections}


def report_sections(spec: dict) -> dict[str, dict]:
    """Heading -> the panel grid that follows it, from a report spec in the wire format."""
    assert spec["kind"] == "report"
    grids, heading = {}, None
    for block in spec["spec"]["spec"]["blocks"]:
        if block["type"] == "heading":
            heading = block["children"][0]["text"]
        elif block["type"] == "panel-grid":
            grids[heading] = block["metadata"]
    return grids


def panel_keys(panel: dict) -> tuple[set[str], set[str], set[str]]:
    """``(metric keys, config keys, metric patterns)`` a panel of the wire format reads."""
    config, kind = panel["config"], panel["viewType"]
    metrics, configs, patterns = set(), set(), set()
    if kind == LINE:
        metrics |= {config["xAxis"], *config.get("metrics", [])}
        if config.get("metricRegex"):
            patterns.add(config["metricRegex"])
    elif kind == SCATTER:
        for axis in ("xAxis", "yAxis", "zAxis"):
            if axis in config:
                section, name = config[axis].split(":", 1)
                if section == "summary":
                    metrics.add(name)
                else:
                    assert section == "config", config[axis]
                    configs.add(name.replace(".value", "", 1))  # data.value.num_train: data.num_train
    elif kind == BAR:
        metrics |= set(config["metrics"])
    elif kind == MEDIA:
        metrics |= set(config["mediaKeys"])
    else:
        raise AssertionError(f"no key check for a {kind} panel")
    return metrics, configs, patterns


def all_keys(spec: dict) -> tuple[set[str], set[str], set[str]]:
    if spec["kind"] == "workspace":
        panels = [p for ps in workspace_sections(spec).values() for p in ps]
    else:
        panels = [
            p for grid in report_sections(spec).values() for p in grid["panelBankSectionConfig"]["panels"]
        ]
    out = (set(), set(), set())
    for panel in panels:
        for found, got in zip(out, panel_keys(panel), strict=True):
            found |= got
    return out


# --- what the logging code can spell -------------------------------------------------------------

NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?")
NUMERIC, TEXT = "<number>", "<text>"
# Code that reads keys back rather than logging them; its copies of the keys must not count.
READERS = {PACKAGE / "dashboard.py", PACKAGE / "cli" / "dashboard.py", PACKAGE / "cli" / "compare.py"}


class Spelled:
    """The metric names the project's logging code can produce, from its source alone.

    A name counts when it is a string literal of the code, or an f-string of the code whose fields are
    filled by such names (recursively), or by numbers where a field is formatted as a number
    (``{sigma:.3g}``). So ``eval/fd_digits_cnn_vs_heldout`` is spelled by ``f"eval/{k}"``
    (the evaluation callback) around ``f"fd_{self.name}_vs_heldout"`` (the held-out comparison)
    around ``"digits_cnn"`` (the feature extractor's name). Literals of code that only reads keys
    (:data:`READERS`) are left out.
    """

    def __init__(self, files: list[Path]):
        self.literals: set[str] = set()
        self.templates: list[tuple[str, ...]] = []
        for path in files:
            tree = ast.parse(path.read_text())
            inside_fstrings = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.JoinedStr):
                    inside_fstrings |= {id(n) for n in ast.walk(node) if n is not node}
                    self.templates.append(tuple(self._part(v) for v in node.values))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and id(node) not in inside_fstrings
                ):
                    self.literals.add(node.value)

    @staticmethod
    def _part(value: ast.expr) -> str:
        if isinstance(value, ast.Constant):
            return str(value.value)
        spec = value.format_spec
        text = "".join(v.value for v in spec.values if isinstance(v, ast.Constant)) if spec else ""
        return NUMERIC if re.search(r"[bdeEfFgGn%xXo]$", text) else TEXT

    @functools.cache  # noqa: B019 - one instance per session
    def __call__(self, name: str, depth: int = 4) -> bool:
        if name in self.literals:
            return True
        if depth == 0:
            return False
        return any(self._fits(t, name, depth) for t in self.templates if self._plausible(t, name))

    @staticmethod
    def _plausible(template: tuple[str, ...], name: str) -> bool:
        fixed = [p for p in template if p not in (NUMERIC, TEXT)]
        if not fixed or not all(p in name for p in fixed):
            return False
        first, last = template[0], template[-1]
        return (first in (NUMERIC, TEXT) or name.startswith(first)) and (
            last in (NUMERIC, TEXT) or name.endswith(last)
        )

    def _fits(self, parts: tuple[str, ...], name: str, depth: int) -> bool:
        if not parts:
            return name == ""
        head, rest = parts[0], parts[1:]
        if head not in (NUMERIC, TEXT):
            return name.startswith(head) and self._fits(rest, name[len(head) :], depth)
        for end in range(1, len(name) + 1):
            piece = name[:end]
            fits = NUMBER.fullmatch(piece) if head == NUMERIC else self(piece, depth - 1)
            if fits and self._fits(rest, name[end:], depth):
                return True
        return False


@pytest.fixture(scope="module")
def spelled() -> Spelled:
    files = [p for p in PACKAGE.rglob("*.py") if p not in READERS]
    # trainer/global_step, the x axis of every curve, is added by Lightning's wandb logger.
    return Spelled(files + [Path(lightning_wandb.__file__)])


# --- the command, offline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("dashboard")
    out = home / "specs" / "dashboard.json"
    proc = command([f"out={out}"], home)
    return proc, out


def test_command_writes_the_workspace_spec_offline_and_says_how_to_upload_it(offline_run):
    proc, out = offline_run
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if str(out) in line]
    assert len(lines) == 1 and f"ld-dashboard mode=online from_spec={out}" in lines[0]
    spec = json.loads(out.read_text())
    assert spec["spec"]["project"] == "lightning_diff" and spec["spec"]["displayName"] == "lightning_diff"
    sections = workspace_sections(spec)
    assert list(sections) == SECTION_TITLES
    assert {name: [p["viewType"] for p in panels] for name, panels in sections.items()} == PANEL_KINDS


def test_workspace_panels_plot_the_logged_keys(offline_run):
    sections = workspace_sections(json.loads(offline_run[1].read_text()))
    losses = [p["config"] for p in sections["Loss curves"]]
    assert [c["metrics"] for c in losses] == [["train/loss"], ["val/loss"]]
    assert all(c["xAxis"] == "trainer/global_step" and c["groupBy"] == "group" for c in losses)
    frontier, by_size, floor = (p["config"] for p in sections["Memorization frontier"])
    assert (frontier["xAxis"], frontier["yAxis"]) == ("summary:eval/data_copying_ct", f"summary:{FD}")
    assert (by_size["xAxis"], by_size["yAxis"]) == (
        "config:data.value.num_train",
        "summary:eval/data_copying_ct",
    )
    assert floor["metrics"] == [FD, f"{FD}_floor"]
    nfe, skip = (p["config"] for p in sections["FD against NFE"])
    assert (nfe["xAxis"], nfe["yAxis"]) == ("summary:eval/nfe", f"summary:{FD}")
    assert skip["xAxis"] == "config:sampler.value.skip_fraction"
    figure, means, *per_sigma = (p["config"] for p in sections["Score deviation"])
    assert figure["mediaKeys"] == ["eval/score_deviation"]
    assert means["metrics"] == [f"deviation/{r}/mean" for r in ("gaussian", "gmm", "empirical")]
    assert [c["metricRegex"] for c in per_sigma] == [
        f"^deviation/{r}/sigma_.*" for r in ("gaussian", "gmm", "empirical")
    ]


def test_report_has_a_heading_and_a_panel_grid_per_section(no_key, tmp_path):
    result = dashboard(compose(["kind=report", f"out={tmp_path / 'r.json'}", "name=memorization"]))
    assert result == {"kind": "report", "mode": "offline", "out": str(tmp_path / "r.json")}
    spec = json.loads((tmp_path / "r.json").read_text())
    assert spec["spec"]["displayName"] == "memorization"
    grids = report_sections(spec)
    assert list(grids) == SECTION_TITLES
    kinds = {
        name: [p["viewType"] for p in g["panelBankSectionConfig"]["panels"]] for name, g in grids.items()
    }
    assert kinds == PANEL_KINDS
    assert grids["Loss curves"]["runSets"][0]["grouping"] == [{"section": "run", "name": "group"}]
    assert grids["Memorization frontier"]["runSets"][0]["grouping"] == []
    # Offline, no run set names a project: binding one asks the server for its id.
    assert all("project" not in g["runSets"][0] for g in grids.values())


def test_sections_and_feature_space_choose_what_is_built(no_key, tmp_path):
    out = tmp_path / "d.json"
    dashboard(compose([f"out={out}", "sections=[nfe,frontier,nfe]", "feature_space=raw"]))
    sections = workspace_sections(json.loads(out.read_text()))
    assert list(sections) == ["FD against NFE", "Memorization frontier"]
    assert sections["FD against NFE"][0]["config"]["yAxis"] == "summary:eval/fd_raw_vs_heldout"


@pytest.mark.parametrize("kind", ["workspace", "report"])
def test_spec_round_trips_through_the_library_model(kind):
    from wandb_workspaces.reports.v2 import internal as report_model
    from wandb_workspaces.workspaces import internal as workspace_model

    built = dash.build_dashboard(kind=kind, entity="team")
    spec = json.loads(json.dumps(dash.to_spec(built)))
    model = (workspace_model.View if kind == "workspace" else report_model.ReportViewspec).model_validate(
        spec["spec"]
    )
    assert model.display_name == "lightning_diff"
    panels = (
        [p for s in model.spec.section.panel_bank_config.sections for p in s.panels]
        if kind == "workspace"
        else [
            p
            for b in model.spec.blocks
            if hasattr(b, "metadata")
            for p in b.metadata.panel_bank_section_config.panels
        ]
    )
    assert len(panels) == sum(len(kinds) for kinds in PANEL_KINDS.values())
    parsed = dash.from_spec(spec)
    assert type(parsed) is type(built) and parsed.entity == "team"
    assert dash.to_spec(parsed) == spec


def test_written_spec_reads_back(offline_run):
    import wandb_workspaces.reports.v2 as wr

    parsed = dash.read_spec(offline_run[1])
    assert [s.name for s in parsed.sections] == SECTION_TITLES
    assert [type(p) for p in parsed.sections[1].panels] == [wr.ScatterPlot, wr.ScatterPlot, wr.BarPlot]
    assert parsed.sections[1].panels[0].y.name == FD


def test_unreadable_specs_are_config_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"kind": "slides", "spec": {}}')
    (tmp_path / "broken.json").write_text('{"kind": "workspace", "spec": {"entity": 1}}')
    for name, message in [
        ("missing.json", "no such file"),
        ("bad.json", "not an ld-dashboard spec"),
        ("broken.json", "not a valid workspace spec"),
    ]:
        with pytest.raises(ConfigError, match=message):
            dash.read_spec(tmp_path / name)


# --- every key is one the code logs ----------------------------------------------------------------


def test_the_key_check_rejects_keys_the_code_does_not_log(spelled):
    for key in [
        "train/loss",
        "val/loss",
        "trainer/global_step",
        FD,
        "eval/fd_raw_vs_heldout",
        "eval/data_copying_ct",
        "eval/nfe",
        "deviation/gmm/mean",
        "deviation/gaussian/sigma_0.0316",
    ]:
        assert spelled(key), key
    for key in [
        "train/losss",
        "trainer/global_steps",
        "eval/fd_digits_cnn_vs_heldot",
        "eval/fd_cnn_vs_heldout",
        "eval/data_copying_c",
        "deviation/gaussain/mean",
        "deviation/gaussian/sigma_x",
    ]:
        assert not spelled(key), key


@pytest.mark.parametrize("kind", ["workspace", "report"])
def test_every_dashboard_key_is_one_the_code_logs(spelled, kind):
    spec = dash.to_spec(dash.build_dashboard(kind=kind))
    metrics, configs, patterns = all_keys(spec)
    assert {"train/loss", "eval/data_copying_ct", FD, "eval/nfe", "eval/score_deviation"} <= metrics
    assert not [key for key in metrics if not spelled(key)]
    # A pattern must select keys the code logs: its literal head plus a noise level is one of them.
    assert len(patterns) == 3
    for pattern in patterns:
        head = re.fullmatch(r"\^([\w/]+)\.\*", pattern.replace("\\", ""))
        assert head, pattern
        assert re.match(pattern, head[1] + "0.1") and spelled(head[1] + "0.1"), pattern
    # Config keys are keys of the configs the runs log: ld-train's and ld-eval's with a teleport sampler.
    assert configs == {"data.num_train", "sampler.skip_fraction"}
    programs = [compose_named("train", []), compose_named("eval", ["sampler=teleport_ddim"])]
    for key in configs:
        assert any(_has_key(cfg, key) for cfg in programs), key


def _has_key(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


# --- online: the mode decision and save() ---------------------------------------------------------


def test_auto_is_offline_without_a_key_and_never_probes(no_key, monkeypatch):
    monkeypatch.setattr(loggers, "reachable", lambda *a, **k: pytest.fail("probed the server without a key"))
    assert dash.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert dash.resolve_mode("auto") == "offline"


def test_auto_with_a_key_follows_the_server_and_wandb_mode(no_key, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    answers = []
    monkeypatch.setattr(
        loggers, "reachable", lambda host, *a, **k: answers.append(host) or answers[0] == "up"
    )
    assert dash.resolve_mode("auto") == "offline" and answers == [loggers.WANDB_HOST]
    answers[:] = ["up"]
    assert dash.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert dash.resolve_mode("auto") == "offline"
    assert dash.resolve_mode("online") == "online"


def test_online_without_a_key_is_a_config_error(no_key):
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        dash.resolve_mode("online")


def test_online_saves_the_workspace_and_writes_nothing(online, monkeypatch, tmp_path):
    import wandb_workspaces.workspaces as ws

    saved = []
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or self)
    result = dashboard(compose([f"out={tmp_path / 'd.json'}", "entity=team", "project=mine"]))
    assert result == {"kind": "workspace", "mode": "online", "entity": "team", "project": "mine"}
    assert len(saved) == 1 and [s.name for s in saved[0].sections] == SECTION_TITLES
    assert not (tmp_path / "d.json").exists()


def test_online_report_binds_its_run_sets_to_the_default_entity(online, monkeypatch, tmp_path):
    import wandb
    import wandb_workspaces.reports.v2 as wr

    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self: saved.append(self) or self)
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: SimpleNamespace(default_entity="me"))
    dashboard(compose(["kind=report", f"out={tmp_path / 'r.json'}"]))
    (report,) = saved
    runsets = [rs for b in report.blocks if isinstance(b, wr.PanelGrid) for rs in b.runsets]
    assert report.entity == "me" and len(runsets) == 4
    assert {(rs.entity, rs.project) for rs in runsets} == {("me", "lightning_diff")}


def test_from_spec_uploads_the_written_spec(online, monkeypatch, tmp_path):
    import wandb_workspaces.workspaces as ws

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "d.json"
    dashboard(compose([f"out={out}", "sections=[frontier]"]))
    monkeypatch.delenv("WANDB_MODE")
    saved = []
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or self)
    dashboard(compose([f"from_spec={out}", "entity=team", "sections=[loss]"]))
    (board,) = saved
    assert [s.name for s in board.sections] == ["Memorization frontier"]  # the file's, not sections=
    expected = json.loads(out.read_text())
    expected["spec"]["entity"] = "team"
    assert dash.to_spec(board) == expected


def test_from_spec_offline_is_a_config_error(no_key, tmp_path):
    with pytest.raises(ConfigError, match="needs a wandb key"):
        dashboard(compose([f"from_spec={tmp_path / 'd.json'}"]))


def test_a_refused_upload_keeps_the_spec_and_says_how_to_retry(online, monkeypatch, tmp_path):
    import wandb
    import wandb_workspaces.workspaces as ws

    def refuse(self):
        raise wandb.errors.CommError("permission denied\nmore detail")

    monkeypatch.setattr(ws.Workspace, "save", refuse)
    out = tmp_path / "d.json"
    with pytest.raises(ConfigError) as err:
        dashboard(compose([f"out={out}", "entity=team"]))
    assert "permission denied" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert f"from_spec={out}" in str(err.value)
    assert workspace_sections(json.loads(out.read_text()))


# --- errors the user sees as one line -------------------------------------------------------------


def test_bad_value_on_the_command_line_is_one_line(tmp_path):
    proc = command([f"out={tmp_path / 'd.json'}", "sections=[loss,nope]"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: sections: no section 'nope'; known: loss, frontier, nfe, deviation"
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("kind=slides", "kind='slides': use one of workspace, report"),
        ("mode=sometimes", "mode='sometimes'"),
        ("sections=[]", "sections is empty"),
        ("feature_space=auto", "feature_space='auto': use one of raw, digits_cnn"),
        ("references=[gausian]", "references=['gausian']: use some of gaussian, gmm, empirical"),
        ("name='x\U0001f600'", "wandb_workspaces refused the workspace"),
    ],
)
def test_bad_values_are_one_line_config_errors(no_key, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        dashboard(compose([f"out={tmp_path / 'd.json'}", override]))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "d.json").exists()


def test_missing_package_is_one_line_with_the_install_command(tmp_path):
    # The package is blocked before the command is imported: the import must not need it.
    block = "import sys\nsys.modules['wandb_workspaces'] = None"
    proc = command([f"out={tmp_path / 'd.json'}"], tmp_path, prelude=block)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: ld-dashboard needs the wandb-workspaces package: pip install 'lightning_diff[dashboard]'"
    ]
    assert not (tmp_path / "d.json").exists()


def test_missing_package_in_process(monkeypatch):
    loaded = [m for m in sys.modules if m.startswith("wandb_workspaces.")]
    for name in ["wandb_workspaces", "wandb_workspaces.workspaces", "wandb_workspaces.reports.v2", *loaded]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=re.escape(dash.INSTALL_HINT)):
        dash.build_dashboard()
