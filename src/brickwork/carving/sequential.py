"""Carving a model too large for memory: profile, carve and save one decoder layer at a time (GPTQ-style).

:func:`carve_sequential` never holds the whole model. It builds the model's skeleton on the meta device
(:mod:`brickwork.models.lazy`), runs the calibration windows through the embeddings once to capture what the first
decoder layer receives (hidden states, and the keyword arguments the model passes every layer: attention masks,
position ids and embeddings), and then, for each layer in turn:

1. reads the layer's weights from the safetensors checkpoint;
2. runs every calibration batch through it with the FFN hooks of :func:`brickwork.profile` (the same per-layer
   statistics and (x, h) samples, in the same batches, so the same float32 partial sums);
3. carves the FFN with :func:`brickwork.carving.carve.carve_layer` (what :func:`carve_` does per layer: the same
   grouping, router, combine fit and per-layer seed);
4. appends the carved layer's tensors to the output's ``model.safetensors`` and frees the layer.

The outputs passed on to the next layer are the **dense** layer's, computed before the FFN is carved: :func:`carve_`
profiles the dense model in one pass, so every layer's statistics describe the dense model's activations, and this
keeps the sequential carve identical to it (carving layer ``i`` with the inputs the carved layers before it give,
as GPTQ does, would fit each layer to the errors of the ones before; a different method, not this one).

Computation is float32 whatever ``dtype`` says: ``dtype`` is how the carved model is **stored** (bfloat16 halves
the file). Profiling and fitting in float32 keeps the statistics, routers and combine fits identical to
:func:`carve_` on a float32 model; bfloat16 would also be slower on CPUs without native bf16 matmuls (on the
AVX2-only machines here a bf16 matmul runs about 8x slower than float32). A bfloat16 checkpoint is read exactly
(upcast). Memory: one layer in float32, its carved copy, the calibration hidden states ``tokens x d_model x 4``
bytes, the router samples, and the layer's co-activation matrix (``d_ff^2 x 8`` bytes when estimated from a sample).

The output is what :func:`brickwork.save` writes (``brickwork.load`` and ``load_model`` read it), written to a
temporary directory and renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from brickwork.bricks.record import FORMAT, header, layer_record, model_card
from brickwork.bricks.state import _swap_in, _weights_per_neuron
from brickwork.carving.carve import calibration_settings, carve_layer, plan_layers
from brickwork.carving.config import CarveConfig
from brickwork.carving.stream_writer import SafetensorsStreamWriter
from brickwork.data.sources import describe_source
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_directory, atomic_write_text, check_output_dir
from brickwork.memory import GIB, StepMemory, StepMeter
from brickwork.models.lazy import LazyModel, materialise, materialise_parameters, open_lazy_model, release
from brickwork.models.loading import check_window
from brickwork.models.specs import find_ffns
from brickwork.profiling.hooks import FFNCapture
from brickwork.profiling.profile import Profile, capture_callbacks, iter_batches, layer_stats
from brickwork.routing import ROUTERS

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SequentialReport:
    """What :func:`carve_sequential` did, with the time and peak RSS of every step."""

    config: CarveConfig
    output: Path
    dtype: str
    layers: list[int]
    reads: float  # FFN weights read per token / dense, over every FFN, router included (as CarveReport)
    layer_fractions: list[float]
    seconds: float
    calibration: str
    calibration_tokens: int
    steps: list[StepMemory] = field(default_factory=list)
    combine_fits: dict[int, dict] | None = None

    @property
    def peak_rss(self) -> int:
        return max((s.peak_rss for s in self.steps), default=0)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "output": str(self.output),
            "dtype": self.dtype,
            "layers": self.layers,
            "reads": self.reads,
            "layer_fractions": self.layer_fractions,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "calibration_tokens": self.calibration_tokens,
            "peak_rss": self.peak_rss,
            "steps": [s.to_dict() for s in self.steps],
        }


def storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` (a torch dtype or its name) if it is one a carve may be stored in, else ValueError."""
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        return STORAGE_DTYPES[dtype]
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype}")
    return dtype


def resolve_safetensors_model(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """The local directory of a dense model to carve layer by layer: an alias's cache or a Hugging Face directory
    with safetensors weights. GGUF files, hub names and carved models are refused with the reason."""
    from brickwork.models.loading import cache_bundled_model, resolve_model_source

    kind, location = resolve_model_source(name_or_path)
    if kind == "alias":
        return cache_bundled_model(location, progress=progress)
    if kind == "gguf":
        raise BrickworkError(
            f"{location} is a GGUF file; carving layer by layer reads safetensors. Load it once with "
            "brickwork.load_model and save_pretrained the model, or pass its alias"
        )
    if kind == "hub":
        raise BrickworkError(
            f"carving layer by layer reads a local safetensors directory; '{location}' is not one (download it "
            "first, e.g. huggingface-cli download, and pass the directory)"
        )
    path = Path(location)
    if (path / "brickwork.json").is_file():
        raise BrickworkError(f"{path} is already carved; carve its dense parent")
    return path


class _Stop(Exception):
    """Raised by the last recorder: the model's forward need not go further."""


class _LayerInputs:
    """Per calibration batch: the hidden states entering the next layer, and every layer's other arguments."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.extra: list[list[tuple[tuple, dict]]] = []  # [batch][layer] -> (args after hidden, kwargs)


@torch.no_grad()
def _capture_inputs(lazy: LazyModel, blocks: nn.ModuleList, batches, last: int) -> _LayerInputs:
    """Run each batch through the embeddings and record what layers 0..``last`` are called with.

    Each layer's ``forward`` is replaced for the pass by a recorder that returns its input unchanged: the masks
    and position embeddings a model passes its layers depend on the token positions, not on the hidden states,
    so every layer's arguments are recorded in one pass without any layer's weights (Gemma 3, Qwen2 with sliding
    windows pass different masks and rotary tables to different layers)."""
    model = lazy.model
    base = getattr(model, "base_model", model)
    base_prefix = lazy.prefix(base)
    blocks_prefix = lazy.prefix(blocks)
    outside = [
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if name.startswith(base_prefix) and not name.startswith(blocks_prefix)
    ]
    materialise_parameters(lazy, outside)  # embeddings (and the final norm: small)
    captured = _LayerInputs()
    calls: list[tuple[tuple, dict] | None] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            calls[index] = (args, kwargs)
            if index == last:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]

        return forward

    try:
        for i in range(last + 1):
            blocks[i].forward = recorder(i)
        for ids in batches:
            calls[:] = [None] * (last + 1)
            with contextlib.suppress(_Stop):
                base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            if any(call is None for call in calls):
                raise BrickworkError(f"{type(model).__name__} did not call every decoder layer in order")
            args, kwargs = calls[0]
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.hidden.append(hidden.float())
            extra = []
            for args, kwargs in calls:
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                extra.append((args[1:], kwargs))
            captured.extra.append(extra)
    finally:
        for i in range(last + 1):
            blocks[i].__dict__.pop("forward", None)
        for name in outside:
            owner, _, leaf = name.rpartition(".")
            holder = model.get_submodule(owner)
            setattr(holder, leaf, nn.Parameter(torch.empty_like(getattr(holder, leaf), device="meta")))
    model.tie_weights()
    return captured


def _write(writer: SafetensorsStreamWriter, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.is_floating_point():
        stored = tensor.to(dtype)
        if not bool(torch.isfinite(stored).all()):
            if bool(torch.isfinite(tensor).all()):
                raise BrickworkError(
                    f"the weight {name} overflows {dtype}; store the carve in bfloat16 or float32"
                )
            raise BrickworkError(f"the weight {name} holds NaN or infinite values; nothing was saved")
        tensor = stored
    writer.add(name, tensor)


def _header_reserve(names: list[str], carved: int) -> int:
    # about 80 bytes of dtype, shape and offsets per tensor; a carved layer adds a dozen tensors at most
    return 4096 + 2 * sum(len(n) + 80 for n in names) + carved * 16 * 200


@torch.no_grad()
def carve_sequential(
    model: str | os.PathLike,
    config: CarveConfig,
    calib: str | Path,
    out: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    tokenizer=None,
    progress: bool = True,
    overwrite: bool = False,
) -> SequentialReport:
    """Carve ``model`` (an alias or a local safetensors directory) as ``config`` says, one layer at a time, and
    save the carved model to ``out`` with its weights stored in ``dtype`` (see the module docstring).

    In float32 the result is the carve :func:`carve_` and :func:`brickwork.save` give on the fully loaded model
    with the same config and calibration text. ``tokenizer`` defaults to the model directory's. Returns a
    :class:`SequentialReport` with each step's time and peak RSS.
    """
    import transformers

    if config.layer_budgets != "uniform":
        raise BrickworkError(
            "layer_budgets='sensitivity' measures the whole model's loss layer by layer; a sequential carve never "
            "holds the whole model. Carve uniformly, then brickwork.bricks.allocate_budgets on the loaded carve."
        )
    started = time.perf_counter()
    dtype = storage_dtype(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    meter = StepMeter()
    with meter.step("open"):
        location = resolve_safetensors_model(model, progress=progress)
        out = check_output_dir(out, "carve", overwrite, [location])
        lazy = open_lazy_model(location)
        skeleton = lazy.model
        check_window(skeleton, config.window)
        chosen = plan_layers(skeleton, config)
        ffns = find_ffns(skeleton)
        carved_indices = {ffn.index for ffn in chosen}
        last = max(carved_indices)
        if tokenizer is None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(location)
            except (OSError, ValueError) as exc:
                raise BrickworkError(f"{location} holds no tokenizer; pass one (tokenizer=...)") from exc
        needs_samples = ROUTERS[config.router].needs_samples or config.combine != "sum"
        prof_config, sampler = calibration_settings(config, needs_samples)
        blocks = ffns[0].block_path.rpartition(".")[0]
        blocks = skeleton.get_submodule(blocks)
        dense_sizes = {ffn.index: ffn.d_ff * _weights_per_neuron(ffn) for ffn in ffns}
        state_names = list(skeleton.state_dict().keys())

    with meter.step("capture"):
        batches = list(iter_batches(tokenizer, calib, prof_config))
        if not batches:
            raise BrickworkError(
                f"Calibration source '{calib}' gave no window of {prof_config.window} tokens: "
                "give more text or a smaller window."
            )
        tokens = sum(ids.numel() for ids in batches)
        if tokens < prof_config.tokens:
            logger.warning(
                "calibration source '%s' ran out after %d of %d tokens", calib, tokens, prof_config.tokens
            )
        inputs = _capture_inputs(lazy, blocks, batches, last)
        del batches
    logger.info(
        "captured %d tokens' inputs to layer 0 (%.2f GiB)",
        tokens,
        sum(h.numel() * h.element_size() for h in inputs.hidden) / GIB,
    )

    blocks_prefix = lazy.prefix(blocks)
    tied = lazy.tied_names()
    fits: dict[int, dict] = {}
    fractions: dict[int, float] = {}
    records = []
    with atomic_directory(out, "carve", overwrite, [location]) as tmp:
        meta_format = {"format": FORMAT}
        reserve = _header_reserve(state_names, len(carved_indices))
        with SafetensorsStreamWriter(tmp / "model.safetensors", meta_format, reserve) as writer:
            with meter.step("outside layers"):
                # embeddings, final norm, head: one tensor at a time from the checkpoint; a tied tensor once,
                # under the name save() keeps (the first in sorted order)
                for name in state_names:
                    if name.startswith(blocks_prefix) or (name in tied and tied[name][0] != name):
                        continue
                    if name in lazy.checkpoint or name in tied:
                        value = lazy.checkpoint.read([lazy.source_name(name)])
                        _write(writer, name, next(iter(value.values())), dtype)
                    else:  # a persistent buffer the checkpoint does not hold: its built value
                        _write(writer, name, skeleton.state_dict()[name], dtype)
            bar = tqdm(ffns, desc="carving layer by layer", unit="layer", disable=not progress)
            for ffn in bar:
                i, block = ffn.index, ffn.block
                with meter.step("load", i):
                    materialise(lazy, block)
                if i <= last:
                    with meter.step("profile" if i in carved_indices else "forward", i):
                        stats = {i: layer_stats(ffn, prof_config)} if i in carved_indices else {}
                        on_hidden, on_input = capture_callbacks(stats, sampler)
                        hooks = [ffn] if i in carved_indices else []
                        with FFNCapture(hooks, on_hidden=on_hidden, on_input=on_input):
                            for b, hidden in enumerate(inputs.hidden):
                                args, kwargs = inputs.extra[b][i]
                                output = block(hidden, *args, **kwargs)
                                output = output[0] if isinstance(output, tuple) else output
                                # the dense layer's output feeds the next layer (see the module docstring)
                                inputs.hidden[b] = output if i < last else hidden
                    if i == last:
                        inputs = None  # the rest are only copied
                if i in carved_indices:
                    with meter.step("carve", i):
                        # a profile holding this layer only: its coactivation() is the one carve_ reads
                        layer_profile = Profile(layers=[{} for _ in ffns], meta={"tokens": stats[i].tokens})
                        layer_profile.layers[i] = stats[i].result()
                        brick, fit = carve_layer(
                            ffn, config, layer_profile.layers[i], layer_profile.coactivation(i), sampler
                        )
                        del stats, layer_profile
                        if sampler is not None:
                            sampler.inputs.pop(i, None)
                            sampler.hidden.pop(i, None)
                        if fit is not None:
                            fits[i] = fit
                        _swap_in(skeleton, ffn, brick)
                        fractions[i] = brick.read_fraction()
                        records.append(layer_record(i, brick))
                with meter.step("write", i):
                    prefix = lazy.prefix(block)
                    for name, tensor in block.state_dict().items():
                        _write(writer, prefix + name, tensor, dtype)
                    release(block)
                    if i in carved_indices:
                        del brick
                bar.set_postfix_str(f"peak RSS {meter.peak_rss / GIB:.2f} GiB")
            bar.close()
        with meter.step("finish"):
            overall = sum(size * fractions.get(i, 1.0) for i, size in dense_sizes.items()) / sum(
                dense_sizes.values()
            )
            source = describe_source(calib)
            carve = {"config": config.to_dict(), "calibration": source, "calibration_tokens": tokens}
            sequential = {"weights_dtype": dtype_name, "compute_dtype": "float32"}
            meta = header(skeleton, str(model), carve, records, dtype_name, sequential=sequential)
            skeleton.config.dtype = dtype
            skeleton.config.save_pretrained(tmp)
            try:
                generation = transformers.GenerationConfig.from_pretrained(location)
            except OSError:
                generation = getattr(skeleton, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(tmp)
            atomic_write_text(tmp / "README.md", model_card(meta))
            tokenizer.save_pretrained(tmp)
            report = SequentialReport(
                config=config,
                output=Path(out),
                dtype=dtype_name,
                layers=sorted(fractions),
                reads=overall,
                layer_fractions=[fractions[i] for i in sorted(fractions)],
                seconds=0.0,
                calibration=source,
                calibration_tokens=tokens,
                steps=meter.steps,
                combine_fits=fits or None,
            )
            atomic_write_text(tmp / "brickwork.json", json.dumps(meta, indent=2))  # the marker, last
    report.seconds = time.perf_counter() - started
    return report
