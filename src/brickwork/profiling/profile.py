"""Profiling a model's FFN neurons on calibration text: :func:`profile` returns a :class:`Profile`."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from brickwork.data.sources import describe_source, iter_token_windows
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_directory, atomic_write_text
from brickwork.models.specs import find_ffns
from brickwork.profiling.hooks import FFNCapture
from brickwork.profiling.stats import MASS_SHARE_FRACTIONS, NeuronStats, estimate_coactivation
from brickwork.version import __version__

logger = logging.getLogger(__name__)

PROFILE_FORMAT_VERSION = 1


@dataclass
class ProfileConfig:
    """How to profile. See :mod:`brickwork.profiling.stats` for the exact statistic definitions."""

    # (the fields with help text are the options of ``brickwork profile``)
    tokens: int = field(
        default=65536, metadata={"help": "calibration tokens (a multiple of the window is used)"}
    )
    window: int = field(default=512, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    top_fraction: float = field(
        default=0.1, metadata={"help": "k of the top-k activation rate, as a fraction of d_ff"}
    )
    threshold: float = field(
        default=1.0,
        metadata={
            "help": "threshold rate: |h| > THRESHOLD x the token's mean |h| (0 = the ReLU definition h != 0)"
        },
    )
    coactivation: bool = field(default=True, metadata={"help": "compute the co-activation matrix"})
    coactivation_exact_max: int = 4096  # exact co-activation counts up to this d_ff, reservoir sample above
    sample_size: int = 8192  # reservoir size (tokens) for the approximate co-activation
    share_stride: int = 4  # mass shares are averaged over every share_stride-th token
    dead_rate: float = 1e-3  # a neuron is dead if its top-k rate is below this
    seed: int = field(default=0, metadata={"help": "seed of the co-activation sample"})

    def __post_init__(self) -> None:
        checks = [
            (self.tokens >= 1, "tokens must be >= 1"),
            (self.window >= 2, "window must be >= 2"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0 < self.top_fraction <= 1, "top_fraction must be in (0, 1]"),
            (self.threshold >= 0, "threshold must be >= 0"),
            (self.coactivation_exact_max >= 1, "coactivation_exact_max must be >= 1"),
            (self.sample_size >= 1, "sample_size must be >= 1"),
            (self.share_stride >= 1, "share_stride must be >= 1"),
            (0 <= self.dead_rate < 1, "dead_rate must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ProfileConfig: {message}")
        if self.tokens < self.window:
            raise ValueError(
                f"ProfileConfig: tokens ({self.tokens}) must be at least one window ({self.window})"
            )


class TokenSampler:
    """Keeps the FFN input x and activation h of every ``stride``-th token, per layer, up to ``limit`` tokens."""

    def __init__(self, stride: int, limit: int):
        self.stride, self.limit = max(1, stride), limit
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.hidden: dict[int, list[torch.Tensor]] = {}

    def add(self, store: dict[int, list[torch.Tensor]], layer: int, t: torch.Tensor) -> None:
        kept = store.setdefault(layer, [])
        have = sum(len(k) for k in kept)
        if have < self.limit:
            rows = t.reshape(-1, t.shape[-1])[:: self.stride].float()
            kept.append(rows[: self.limit - have].clone())

    def samples(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.inputs[layer]), torch.cat(self.hidden[layer])


@dataclass
class Profile:
    """Per-layer neuron statistics of a model's FFNs, plus where they came from."""

    layers: list[dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    def coactivation(self, layer: int) -> torch.Tensor | None:
        """Co-activation counts of one layer: exact, or estimated from the reservoir sample."""
        stats = self.layers[layer]
        if "coactivation" in stats:
            return stats["coactivation"]
        if "pattern_sample" in stats:
            return estimate_coactivation(
                stats["pattern_sample"].numpy(), stats["topk_rate"].numel(), self.tokens
            )
        return None

    def dead_fraction(self, layer: int) -> float:
        rate = self.layers[layer]["topk_rate"]
        return float((rate < self.meta["config"]["dead_rate"]).float().mean())

    def summary_rows(self) -> list[dict]:
        """One row per layer: dead-neuron fraction, mean rates, and the mass shares of the top neurons."""
        rows = []
        for i, stats in enumerate(self.layers):
            share = stats["mass_share"].tolist()
            rows.append(
                {
                    "layer": i,
                    "d_ff": stats["topk_rate"].numel(),
                    "dead_fraction": self.dead_fraction(i),
                    "threshold_rate_mean": float(stats["threshold_rate"].mean()),
                    **{
                        f"mass_top{round(f * 100)}": s
                        for f, s in zip(MASS_SHARE_FRACTIONS, share, strict=True)
                    },
                }
            )
        return rows

    def save(
        self,
        directory: str | Path,
        overwrite: bool = False,
        extra: Callable[[Path], object] | None = None,
        inputs: tuple = (),
    ) -> Path:
        """Write ``profile.safetensors`` and ``profile.json`` to ``directory`` (atomically); ``extra(tmp)`` may write
        more files (summary, plots) into the same temporary directory before it replaces ``directory``. An existing
        profile is replaced; any other non-empty directory only with ``overwrite=True``."""
        tensors = {
            f"layers.{i}.{name}": t.contiguous() for i, s in enumerate(self.layers) for name, t in s.items()
        }
        with atomic_directory(directory, "profile", overwrite, inputs) as tmp:
            save_file(tensors, str(tmp / "profile.safetensors"), metadata={"format": "brickwork-profile"})
            atomic_write_text(tmp / "profile.json", json.dumps(self.meta, indent=2))
            if extra is not None:
                extra(tmp)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Profile:
        directory = Path(directory)
        meta_path, tensor_path = directory / "profile.json", directory / "profile.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise BrickworkError(
                f"{directory} is not a brickwork profile (expected profile.json and "
                "profile.safetensors); create one with `brickwork profile`."
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BrickworkError(
                f"{meta_path} is damaged ({str(exc)[:200]}); profile the model again"
            ) from exc
        version = meta.get("format_version", 0) if isinstance(meta, dict) else None
        layer_count = meta.get("num_layers") if isinstance(meta, dict) else None
        for name, value, low in (("format_version", version, 0), ("num_layers", layer_count, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BrickworkError(
                    f"{meta_path}: {name} is {value!r}, not a count; profile the model again"
                )
        if version > PROFILE_FORMAT_VERSION:
            writer = meta.get("brickwork_version")
            by = f" (written by brickwork {writer})" if writer and writer != __version__ else ""
            raise BrickworkError(
                f"{directory} uses profile format {meta.get('format_version')}{by}; this brickwork ({__version__}) "
                f"reads format {PROFILE_FORMAT_VERSION} and older: upgrade brickwork to read it."
            )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:
            raise BrickworkError(
                f"{tensor_path} is damaged ({str(exc)[:200]}); profile the model again"
            ) from exc
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(layer_count)]
        for key, tensor in tensors.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= layer_count:
                raise BrickworkError(
                    f"{tensor_path}: {key!r} is not a statistic of one of {layer_count} layers"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BrickworkError(
                    f"{tensor_path}: {key} holds NaN or infinite values; profile the model again"
                )
            layers[int(parts[1])][parts[2]] = tensor
        return cls(layers=layers, meta=meta)


def layer_stats(ffn, config: ProfileConfig) -> NeuronStats:
    """The streaming statistics :func:`profile` keeps for one FFN (its co-activation sample seeded by layer)."""
    return NeuronStats(
        ffn.d_ff,
        config.top_fraction,
        config.threshold,
        config.coactivation,
        config.coactivation_exact_max,
        config.sample_size,
        config.share_stride,
        seed=config.seed + ffn.index,
    )


def capture_callbacks(stats, sampler: TokenSampler | None = None):
    """``(on_hidden, on_input)`` for :class:`FFNCapture` that feed ``stats[layer]`` (a list or dict of
    :class:`NeuronStats`) and ``sampler``; statistics and samples live on the CPU whatever the model's device."""

    def on_hidden(layer: int, h: torch.Tensor) -> None:
        h = h.cpu()
        stats[layer].update(h)
        if sampler is not None:
            sampler.add(sampler.hidden, layer, h)

    on_input = None if sampler is None else (lambda layer, x: sampler.add(sampler.inputs, layer, x.cpu()))
    return on_hidden, on_input


def iter_batches(tokenizer, calib: str | Path, config: ProfileConfig) -> Iterator[torch.Tensor]:
    """``[batch_size, window]`` token ids of ``calib`` (the last batch may hold fewer windows), in the order and
    batching :func:`profile` runs them: the statistics' float32 partial sums and the sampler's stride depend on it."""
    batch: list[torch.Tensor] = []
    for window in iter_token_windows(tokenizer, calib, config.window, config.tokens):
        batch.append(window)
        if len(batch) == config.batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def profile(
    model,
    tokenizer,
    calib: str | Path,
    config: ProfileConfig | None = None,
    progress: bool = True,
    sampler: TokenSampler | None = None,
) -> Profile:
    """Stream ``config.tokens`` calibration tokens from ``calib`` through ``model`` and profile every FFN.

    Only the base model runs (no LM head: profiling needs no logits). Memory does not grow with the token
    count. ``calib`` is any source :func:`brickwork.data.iter_token_windows` accepts. A ``sampler`` also keeps
    some tokens' FFN inputs and activations (to fit routers on) from the same pass.
    """
    config = config or ProfileConfig()
    ffns = find_ffns(model)
    stats = [layer_stats(ffn, config) for ffn in ffns]
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    total = (config.tokens // config.window) * config.window
    started = time.perf_counter()
    on_hidden, on_input = capture_callbacks(stats, sampler)
    with (
        torch.no_grad(),
        FFNCapture(ffns, on_hidden=on_hidden, on_input=on_input),
        tqdm(total=total, unit="tok", desc="profiling", disable=not progress) as bar,
    ):
        for ids in iter_batches(tokenizer, calib, config):
            ids = ids.to(device)
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            bar.update(ids.numel())
    elapsed = time.perf_counter() - started
    tokens = stats[0].tokens if stats else 0
    if tokens == 0:
        raise BrickworkError(
            f"Calibration source '{calib}' gave no window of {config.window} tokens: "
            "give more text or a smaller window."
        )
    if tokens < config.tokens and tokens < total:
        logger.warning("calibration source '%s' ran out after %d of %d tokens", calib, tokens, config.tokens)
    meta = {
        "format": "brickwork-profile",
        "format_version": PROFILE_FORMAT_VERSION,
        "brickwork_version": __version__,
        "model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        "model_type": model.config.model_type,
        "calibration": describe_source(calib),
        "tokens": tokens,
        "num_layers": len(ffns),
        "d_ff": [ffn.d_ff for ffn in ffns],
        "coactivation_exact": [s.coactivation_exact for s in stats],
        "config": asdict(config),
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else math.inf,
    }
    return Profile(layers=[s.result() for s in stats], meta=meta)
