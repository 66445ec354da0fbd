"""`mmprolong_checkpoint.json`: what a Megatron checkpoint of this project holds — the model
config (HF layout), dtype, the parallel layout it was chunked for, package versions and one
checksum per stored chunk. Training saves `SAVE/iter_NNNNNNN/` checkpoints and names the latest
complete one in `SAVE/latest_checkpointed_iteration.txt`, as Megatron-LM does."""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from megatron_mmprolong.config import ConfigError, VLConfig

INFO_FILE = "mmprolong_checkpoint.json"
FORMAT = "megatron-mmprolong/torch_dist"
LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def latest_iteration(save: str | Path) -> int | None:
    marker = Path(save) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{marker}: holds {text[:40]!r}, not an iteration number (a damaged save directory)")
    return int(text)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a training save directory."""
    iteration = latest_iteration(path)
    directory = Path(path) if iteration is None else iteration_dir(path, iteration)
    if not (directory / "metadata.json").is_file():  # megatron-core writes it into every torch_dist checkpoint
        where = f"{directory} (named by {Path(path) / LATEST})" if iteration is not None else str(directory)
        raise ConfigError(f"{where} holds no checkpoint: give a converted checkpoint (convert hf-to-mcore --out) "
                          f"or a training --save directory")
    return directory


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("megatron-mmprolong", "megatron-core", "torch", "transformers", "safetensors"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_info(directory: Path, **fields: Any) -> None:
    info = {"format": FORMAT, "format_version": 1, "versions": package_versions(), **fields}
    (Path(directory) / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


def read_info(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as err:  # not JSON, or not UTF-8
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    return info


def checkpoint_config(mcore_dir: str | Path, hf_template: str | Path | None = None) -> VLConfig:
    """The model config of a Megatron checkpoint: its info file, else the template's config.json."""
    info = read_info(mcore_dir)
    if info is not None:
        return VLConfig.from_hf_dict(info["hf_config"])
    if hf_template is not None:
        return VLConfig.from_hf_dir(hf_template)
    raise ConfigError(
        f"{mcore_dir}: no {INFO_FILE} (checkpoint not written by mmprolong); pass --hf-template "
        "with the model's config.json"
    )
