"""One reviewable page per experiment, and the same results as a W&B report.

``report_command`` writes ``results/<experiment>/report.html``: a single file with every figure
embedded as a base64 PNG, the MAD and relative-difference tables, each claim's verdict, the
status counts of the extracted samples and the provenance a reviewer needs to trust them (git
commit, config hash, package versions, model and data checksums). It is self-contained so that it
can be mailed, attached to a review or opened from a DVC checkout without the rest of the tree.

It then builds a W&B report (``wandb_workspaces``) with a section per experiment that has results:
its claims table and a media panel of the figures, which the same step logs to a run in the
experiment's group. Without a login (or with ``wandb.mode`` other than online) the report is
built and validated, its spec written next to the HTML, and saving it is left for later.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import time
from datetime import UTC, datetime
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markdown_it import MarkdownIt
from omegaconf import DictConfig

from gradspec import paths, tracking
from gradspec.config import compose, config_dir, config_hash, experiment_files, project_root

log = logging.getLogger(__name__)

TEMPLATE = resources.files("gradspec") / "report.html.j2"

PACKAGES = (
    "gradspec",
    "torch",
    "transformers",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "matplotlib",
    "hydra-core",
    "snakemake",
    "wandb",
    "wandb-workspaces",
)
# Figure file stems are "<task>_<condition or overlay>_<metric>"; the papers' figures first.
FIGURE_ORDER = ("correct", "irrelevant", "overlay")
TABLE_TITLES = {"mad": "MAD across layers", "relative_difference": "Relative differences"}


# --------------------------------------------------------------------------------------------
# What the page shows


def embed_png(path: Path) -> str:
    """A ``data:`` URL, so the page needs no file next to it."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figure_key(path: Path) -> tuple[int, str]:
    kinds = [index for index, kind in enumerate(FIGURE_ORDER) if f"_{kind}_" in path.stem]
    return (kinds[0] if kinds else len(FIGURE_ORDER), path.stem)


def figures(folder: Path) -> list[dict[str, str]]:
    return [
        {"name": path.stem, "src": embed_png(path)}
        for path in sorted(folder.glob("*.png"), key=figure_key)
    ]


def frame_html(frame: pd.DataFrame) -> str:
    return frame.to_html(
        index=False,
        border=0,
        classes="data",
        na_rep="--",
        float_format=lambda value: f"{value:.4g}",
    )


def tables(folder: Path) -> list[dict[str, str]]:
    """The tables step's CSVs, MAD first, each with a title taken from its file name."""
    found = []
    for prefix, title in TABLE_TITLES.items():
        for path in sorted(folder.glob(f"{prefix}_*.csv")):
            detail = path.stem[len(prefix) + 1 :].replace("_", " ")
            found.append(
                {
                    "id": path.stem,
                    "title": f"{title}: {detail}",
                    "html": frame_html(pd.read_csv(path)),
                }
            )
    return found


def status_counts(summary: Path) -> str:
    path = summary / "status_counts.csv"
    return frame_html(pd.read_csv(path)) if path.exists() else ""


def claim_rows(findings: dict) -> list[dict[str, Any]]:
    """One row per claim of one model: its statement, verdict and the tally behind it."""
    rows = []
    for key, claim in sorted(findings.get("claims", {}).items()):
        tally = claim.get("counts") or {}
        rows.append(
            {
                "model": findings.get("model", ""),
                "claim": key,
                "statement": claim.get("statement", ""),
                "testable": bool(claim.get("testable", True)),
                "verdict": claim.get("verdict")
                or ("not testable" if not claim.get("testable", True) else ""),
                "tally": ", ".join(f"{name} {count}" for name, count in tally.items()),
            }
        )
    return rows


def verdict_class(verdict: str) -> str:
    return {"holds": "holds", "does not hold": "fails"}.get(verdict, "open")


def findings_html(path: Path) -> str:
    if not path.exists():
        return ""
    return MarkdownIt("commonmark").enable("table").render(path.read_text())


# --------------------------------------------------------------------------------------------
# Provenance


def git_state(root: Path) -> dict[str, Any] | None:
    """The checkout's commit and whether the work tree differs from it; None outside git."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_provenance(models_dir: str, model: str) -> dict[str, Any]:
    """Where the weights came from and their checksums (written when the model was prepared)."""
    meta = read_json(paths.model_dir(models_dir, model) / "provenance.json")
    return {
        "model": model,
        "package": " ".join(
            str(meta[key]) for key in ("package", "hf_id", "package_version") if meta.get(key)
        ),
        "source_sha256": meta.get("gguf_sha256") or "",
        "weights_sha256": meta.get("safetensors_sha256") or {},
    }


def data_provenance(cfg: DictConfig, experiment: str, model: str) -> list[dict[str, Any]]:
    """Per data file: the shipped file's checksum, the prepared file's and the samples' statuses."""
    rows = []
    for spec in experiment_files(cfg, [f"experiment={experiment}"]):
        prepared = paths.prepared_data(spec.dataset, spec.file)
        source = read_json(prepared.with_suffix(".meta.json"))
        spectra = paths.spectra(cfg.results_dir, experiment, model, spec.dataset, spec.file)
        meta = read_json(spectra.with_suffix(".meta.json"))
        rows.append(
            {
                "model": model,
                "file": f"{spec.dataset}/{spec.file}",
                "source_sha256": source.get("source_sha256", ""),
                "prepared_sha256": meta.get("input_sha256", ""),
                "statuses": ", ".join(
                    f"{k} {v}" for k, v in (meta.get("status_counts") or {}).items()
                ),
                "seconds": meta.get("seconds", ""),
                "config_hash": meta.get("config_hash", ""),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# The page


def experiment_context(cfg: DictConfig, experiment: str) -> dict[str, Any]:
    """Everything the page says about one experiment, read from its results folder."""
    exp_cfg = compose([f"experiment={experiment}", f"results_dir={cfg.results_dir}"])
    models = []
    for model in exp_cfg.experiment.models:
        summary = paths.summary_dir(cfg.results_dir, experiment, model)
        findings = read_json(summary / "findings.json")
        models.append(
            {
                "name": model,
                "figures": figures(paths.figures_dir(cfg.results_dir, experiment, model)),
                "tables": tables(paths.tables_dir(cfg.results_dir, experiment, model)),
                "status_counts": status_counts(summary),
                "claims": claim_rows(findings),
                "provenance": model_provenance(cfg.models_dir, model),
                "data": data_provenance(exp_cfg, experiment, model),
            }
        )
    folder = paths.experiment_dir(cfg.results_dir, experiment)
    return {
        "name": experiment,
        "description": exp_cfg.experiment.description,
        "models": models,
        "findings_html": findings_html(folder / "findings.md"),
        "config_hash": config_hash(exp_cfg),
    }


def render_html(context: dict[str, Any]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["verdict_class"] = verdict_class
    return env.from_string(TEMPLATE.read_text()).render(**context)


def write_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_html(cfg: DictConfig, experiment: str) -> tuple[Path, dict[str, Any]]:
    context = experiment_context(cfg, experiment)
    page = {
        "experiment": context,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_state(project_root()),
        "config_hash": config_hash(cfg),
        "versions": package_versions(),
    }
    target = paths.experiment_dir(cfg.results_dir, experiment) / "report.html"
    write_atomic(render_html(page), target)
    return target, context


# --------------------------------------------------------------------------------------------
# The W&B report


def experiments_with_results(results_dir: str, current: str) -> list[str]:
    """Every configured experiment that has findings, the current one first."""
    names = sorted(path.stem for path in (config_dir() / "experiment").glob("*.yaml"))
    done = [
        name
        for name in names
        if name != current and (paths.experiment_dir(results_dir, name) / "findings.md").exists()
    ]
    return [current, *done]


def claims_markdown(context: dict[str, Any]) -> str:
    lines = ["| model | claim | verdict | tally | statement |", "|---|---|---|---|---|"]
    for model in context["models"]:
        for row in model["claims"]:
            lines.append(
                f"| {row['model']} | {row['claim']} | **{row['verdict']}** | {row['tally']} "
                f"| {row['statement']} |"
            )
    return "\n".join(lines)


def wandb_blocks(context: dict[str, Any], entity: str, project: str) -> list:
    """One experiment's section: heading, description, claims table, and its figures."""
    import wandb_workspaces.reports.v2 as wr

    blocks = [wr.H1(text=f"Experiment: {context['name']}")]
    if context["description"]:
        blocks.append(wr.P(text=str(context["description"])))
    blocks += [wr.H2(text="Claims"), wr.MarkdownBlock(text=claims_markdown(context))]
    keys = [
        f"figures/{model['name']}/{figure['name']}"
        for model in context["models"]
        for figure in model["figures"]
    ]
    if keys:
        runset = wr.Runset(
            entity=entity,
            project=project,
            name=f"{context['name']} report",
            filters=f"Metric('group') == '{context['name']}' and Metric('job_type') == 'report'",
        )
        panel = wr.MediaBrowser(title="The papers' figures", media_keys=keys, num_columns=2)
        blocks += [wr.H2(text="Figures"), wr.PanelGrid(runsets=[runset], panels=[panel])]
    return blocks


def logged_in() -> bool:
    """Whether saving can work: an API key in the environment or wandb's stored login."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.Api().api_key)
    except Exception:  # noqa: BLE001 - any failure to find a login means: not logged in
        return False


def build_wandb_report(cfg: DictConfig, contexts: list[dict[str, Any]]):
    """The report object, validated by converting it to W&B's own model (no network)."""
    import wandb_workspaces.reports.v2 as wr

    entity = cfg.wandb.entity or ""
    project = str(cfg.wandb.project)
    blocks = [wr.TableOfContents()]
    for context in contexts:
        blocks += wandb_blocks(context, entity, project)
    report = wr.Report(
        entity=entity,
        project=project,
        title=f"gradspec: {', '.join(context['name'] for context in contexts)}"[:128],
        description="Layer-wise gradient spectra: the papers' claims and figures.",
        blocks=blocks,
        width="fluid",
    )
    return report, report._to_model()


def log_report_figures(cfg: DictConfig, context: dict[str, Any]) -> None:
    """The figures the media panel shows, logged under figures/<model>/<name> in a report run."""
    experiment = context["name"]
    with tracking.start_run(cfg, job_type="report", name=f"report-{experiment}") as run:
        for model in context["models"]:
            folder = paths.figures_dir(cfg.results_dir, experiment, model["name"])
            tracking.log_figures(
                run, sorted(folder.glob("*.png")), prefix=f"figures/{model['name']}"
            )


def publish_wandb_report(cfg: DictConfig, contexts: list[dict[str, Any]], spec: Path) -> str | None:
    """Save the report where a login allows it (returns its URL); else validate, keep its spec."""
    report, model = build_wandb_report(cfg, contexts)
    write_atomic(model.model_dump_json(indent=1, by_alias=True, exclude_none=True) + "\n", spec)
    if str(cfg.wandb.mode) != "online" or not cfg.wandb.entity or not logged_in():
        log.info(
            "W&B report built and validated (%d blocks, spec %s); saving it needs a login "
            "(wandb login or WANDB_API_KEY), wandb.mode=online and wandb.entity",
            len(report.blocks),
            spec,
        )
        return None
    report.save()
    log.info("W&B report saved: %s", report.url)
    print(report.url)
    return report.url


def report_command(cfg: DictConfig) -> int:
    """Write the experiment's HTML report, then build (and where possible save) the W&B one."""
    started = time.perf_counter()
    experiment = cfg.experiment.name
    target, context = build_html(cfg, experiment)
    n_figures = sum(len(model["figures"]) for model in context["models"])
    n_tables = sum(len(model["tables"]) for model in context["models"])
    log.info(
        "wrote %s: %d models, %d figures, %d tables, %d bytes (%.2f s)",
        target,
        len(context["models"]),
        n_figures,
        n_tables,
        target.stat().st_size,
        time.perf_counter() - started,
    )
    started = time.perf_counter()
    contexts = [context] + [
        experiment_context(cfg, name)
        for name in experiments_with_results(cfg.results_dir, experiment)[1:]
    ]
    log_report_figures(cfg, context)
    publish_wandb_report(cfg, contexts, target.with_name("wandb_report.json"))
    log.info("W&B report of %d experiments (%.2f s)", len(contexts), time.perf_counter() - started)
    return 0
