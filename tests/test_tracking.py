"""W&B tracking: real offline runs on disk, disabled mode, and no hang without a network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from gradspec import tracking
from gradspec.config import compose

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, *extra: str):
    return compose([f"wandb.dir={tmp_path / 'wandb'}", *extra])


def _records(path: Path) -> list[bytes]:
    """The payloads of a run's transaction log: a 7-byte header, then 32 KiB blocks of records
    (4-byte checksum, 2-byte length, 1-byte type) that may split one payload across blocks."""
    data, pos, block = path.read_bytes(), 7, 32768
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _curves() -> pd.DataFrame:
    rows = [
        {"module": module, "layer": layer, "kind": kind, "mean": layer + offset}
        for module, offset in (("q_proj", 0.0), ("down_proj", 1.0))
        for layer in range(3)
        for kind in ("none", "detailed")
    ]
    return pd.DataFrame(rows)


def test_scrub_drops_credentials():
    clean = tracking.scrub({"wandb": {"api_key": "x", "project": "p"}, "HF_TOKEN": "t", "a": [1]})
    assert clean == {"wandb": {"project": "p"}, "a": [1]}


def test_disabled_yields_none(tmp_path):
    with tracking.start_run(_cfg(tmp_path, "wandb.mode=disabled"), "test") as run:
        assert run is None
        tracking.log_curves(run, _curves())
        tracking.log_figures(run, [])
        tracking.log_artifact_reference(run, "x", tmp_path)
    assert not (tmp_path / "wandb").exists()


def test_offline_run_writes_config_and_keys(tmp_path):
    figure = tmp_path / "fig.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1])
    plt.savefig(figure)
    plt.close()
    spectra = tmp_path / "spectra"
    spectra.mkdir()
    (spectra / "a.parquet").write_bytes(b"x")

    cfg = _cfg(tmp_path)
    with tracking.start_run(cfg, "reduce", name="reduce-test") as run:
        assert run is not None
        tracking.log_curves(run, _curves())
        tracking.log_figures(run, [figure, tmp_path / "fig.svg"])
        tracking.log_artifact_reference(run, "spectra test", spectra)
        run_dir = Path(run.dir).parent

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs == [run_dir]
    assert list(run_dir.glob("*.wandb")), "no transaction log"
    # Offline, the config, history and artifacts live in the run's transaction log until sync.
    log = b"\n".join(record for path in run_dir.glob("*.wandb") for record in _records(path))
    for text in (
        "quickstart",
        "smollm2_135m_instruct",
        "curves/table",
        "curves/mean",
        "figures/fig",
    ):
        assert text.encode() in log, text
    assert b"spectra-test" in log and b"reduce-test" in log
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for unshare -n"
)
def test_no_network_returns_quickly(tmp_path):
    script = textwrap.dedent(
        f"""
        from gradspec import tracking
        from gradspec.config import compose
        cfg = compose(["wandb.dir={tmp_path / "wandb"}", "wandb.init_timeout=20"])
        with tracking.start_run(cfg, "test") as run:
            run.log({{"x": 1}})
        """
    )
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    started = time.perf_counter()
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script], env=env, timeout=90, cwd=ROOT
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0
    assert seconds < 60, f"took {seconds:.1f} s"
    assert list((tmp_path / "wandb").glob("offline-run-*"))
