"""The HTML report of the real two-sample workflow run, opened in headless Chromium, and the W&B
report built offline from the same results."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from slurm_cluster import Unavailable, install_packages
from workspace import BIN, LIMIT, MODEL, workflow_env  # noqa: F401

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        install_packages(("chromium",), ("chromium",))
    except Unavailable as reason:
        pytest.skip(f"no headless Chromium: {reason}")
    return shutil.which("chromium") or "/usr/bin/chromium"


def browse(chromium: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on the page with a fresh profile, bounded in time."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            ["timeout", "-k", "10", "120", chromium, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", *args, page.as_uri()],
            capture_output=True,
            text=True,
        )  # fmt: skip


@pytest.fixture(scope="session")
def report(finished_workspace) -> Path:
    """The report the workflow's report rule wrote, rebuilt if an earlier workspace lacks it."""
    page = finished_workspace / "results" / "quickstart" / "report.html"
    if not page.exists():
        subprocess.run(
            [str(BIN / "gradspec"), "report", "data.limit=2"],
            cwd=finished_workspace,
            env=workflow_env(finished_workspace),
            check=True,
        )
    return page


@pytest.mark.slow
def test_report_loads_every_figure_without_console_errors(report, chromium):
    figures = len(list((report.parent / MODEL / "figures").glob("*.png")))
    assert figures > 0
    done = browse(
        chromium, report, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
        "--dump-dom",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'data-figures-loaded="{figures}"' in done.stdout
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    # Self-contained: no file, http or relative reference that a mailed copy would lose.
    sources = re.findall(r'(?:src|href)="([^"#]+)"', report.read_text())
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)

    screenshot = report.with_suffix(".png")
    shot = browse(
        chromium, report, f"--screenshot={screenshot}", "--window-size=1280,2400",
        "--hide-scrollbars",
    )  # fmt: skip
    assert shot.returncode == 0, shot.stderr[-3000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"report: {report}\nscreenshot: {screenshot}", file=sys.stderr)


@pytest.mark.slow
def test_report_shows_verdicts_tables_and_provenance(report, finished_workspace):
    text = report.read_text()
    findings = json.loads((report.parent / MODEL / "summary" / "findings.json").read_text())
    for key, claim in findings["claims"].items():
        verdict = claim["verdict"] if claim["testable"] else "not testable"
        assert re.search(rf"<td>{key}</td>\s*<td><span class=\"verdict [a-z]+\">{verdict}<", text)
    assert "MAD across layers: nuclear norm" in text and "Relative differences" in text
    provenance = json.loads(
        (finished_workspace / "resources" / "models" / MODEL / "provenance.json").read_text()
    )
    assert provenance["gguf_sha256"] in text
    meta = json.loads(next((report.parent / MODEL / "spectra").rglob("*.meta.json")).read_text())
    assert meta["input_sha256"] in text and meta["config_hash"] in text
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=finished_workspace, capture_output=True, text=True
    ).stdout.strip()
    assert commit and commit in text
    log = finished_workspace / "results" / "logs" / "quickstart" / "report.log"
    assert re.search(r"workflow: report: exit 0, 1 files, \d+ bytes, [\d.]+ s", log.read_text())


@pytest.mark.slow
def test_wandb_report_offline_is_built_and_validated(report, finished_workspace):
    """No API key: the report object is built, checked against W&B's model and kept as JSON."""
    from wandb_workspaces.reports.v2.internal import ReportViewspec

    env = {k: v for k, v in workflow_env(finished_workspace).items() if k != "WANDB_API_KEY"}
    done = subprocess.run(
        [str(BIN / "gradspec"), "report", "data.limit=2", "wandb.mode=offline"],
        cwd=finished_workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "W&B report built and validated" in done.stderr and "needs a login" in done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # W&B's model warns, not raises, on a block it rejects
        spec = ReportViewspec.model_validate_json((report.parent / "wandb_report.json").read_text())
    blocks = spec.spec.blocks
    text = json.dumps(json.loads((report.parent / "wandb_report.json").read_text()))
    assert len(blocks) >= 5 and "Experiment: quickstart" in text
    findings = json.loads((report.parent / MODEL / "summary" / "findings.json").read_text())
    assert all(claim["statement"][:40] in text for claim in findings["claims"].values())
    assert f"figures/{MODEL}/" in text


def test_report_is_versioned_with_the_results():
    """DVC tracks results/<experiment>/, so the report is pushed and pulled with the spectra."""
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    outs = stages["stages"]["results"]["do"]["outs"]
    assert "results/${item}" in outs
    from gradspec import paths

    assert str(paths.experiment_dir("results", "X") / "report.html").startswith("results/X/")


def test_report_rule_is_in_the_default_target():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--forceall", "--config", LIMIT],
        cwd=root,
        env=workflow_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "rule report:" in done.stdout and "results/quickstart/report.html" in done.stdout
