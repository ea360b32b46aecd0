"""The ``gradspec`` command: one subcommand per pipeline step, each taking Hydra overrides.

Every subcommand composes the same config as Snakemake does (``config/`` plus ``key=value``
overrides) and hands it to one module's function, so each step runs the same inside and outside
the workflow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare-model": (
        "gradspec.models",
        "prepare_model_command",
        "GGUF package or hub id -> safetensors folder",
    ),
    "prepare-data": (
        "gradspec.data",
        "prepare_data_command",
        "validate a dataset's files, give ids",
    ),
    "extract": ("gradspec.extract", "extract_command", "per-sample gradient spectra -> Parquet"),
    "merge": ("gradspec.merge", "merge_command", "concatenate a file's shard spectra in order"),
    "reduce": ("gradspec.reduce", "reduce_command", "per-layer curves, intervals and MAD"),
    "plot": ("gradspec.plots", "plot_command", "the papers' figures"),
    "tables": (
        "gradspec.tables",
        "tables_command",
        "MAD and difference tables as CSV, Markdown, LaTeX",
    ),
    "findings": ("gradspec.findings", "findings_command", "each claim of the papers: holds or not"),
    "report": ("gradspec.report", "report_command", "HTML report and W&B report"),
    "bench": ("gradspec.bench", "bench_command", "the papers' method against the engine"),
    "quality": ("gradspec.quality", "quality_command", "paper 2's data-quality claims per model"),
    "score": ("gradspec.score", "score_command", "add spectral scores to a dataset, select by one"),
    "import-reference": ("gradspec.reference", "import_command", "read the papers' own statistics"),
}


# Errors that describe a bad input, config or model: reported in one line, exit code 2.
USER_ERRORS = (
    ("gradspec.config", "ConfigError"),
    ("gradspec.data", "DataError"),
    ("gradspec.models", "ModelError"),
    ("gradspec.extract", "ExtractionError"),
)
USAGE_EXIT = 2


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of USER_ERRORS whose module is loaded; an error's own module always is."""
    return tuple(getattr(sys.modules[m], n) for m, n in USER_ERRORS if m in sys.modules)


def one_line(text: str) -> str:
    """A multi-line message (Hydra's list of options) as one line; search paths left out."""
    text = text.split("Config search path:", 1)[0]
    out: list[str] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        if out and out[-1].endswith(":"):
            out[-1] += " " + line
        elif out and out[-1].rsplit(":", 1)[-1].strip() and line.isidentifier():
            out[-1] += ", " + line
        else:
            out.append(line)
    return "; ".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradspec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, text) in COMMANDS.items():
        step = sub.add_parser(name, help=text, description=text)
        step.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
        step.add_argument("--print-config", action="store_true", help="print the config and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from gradspec.config import ConfigError, compose, to_yaml

    try:
        cfg = compose(args.overrides)
    except ConfigError as error:
        print(f"gradspec {args.command}: error: {one_line(str(error))}", file=sys.stderr)
        return USAGE_EXIT
    if args.print_config:
        print(to_yaml(cfg))
        return 0

    module_name, function_name, _ = COMMANDS[args.command]
    command = getattr(importlib.import_module(module_name), function_name)
    try:
        result = command(cfg)
    except Exception as error:
        if not isinstance(error, _user_error_types()):
            raise
        logging.getLogger(module_name).debug("details", exc_info=True)
        print(f"gradspec {args.command}: error: {one_line(str(error))}", file=sys.stderr)
        return USAGE_EXIT
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
