"""Golden outputs: what brickwork computes, as SHA-256 digests, so that a redesign can be shown to change nothing.

Recorded cases (every one deterministic on one machine):

- ``battery/<arch>/<method>/<router>``: the shared battery's sparse carve (8 experts, 1 shared, top-2) of every tiny
  architecture x grouping method x router: the carved state dict, each carved layer's routing on its own inputs,
  and the logits of one token (the per-token path), 24 tokens (the batch path) and 640 tokens (grouped matmuls);
- ``smollm2/neuron`` and ``smollm2/stock``: SmolLM2-135M carved at 25% with the neuron-level preset and at 50%
  with ``--stock`` (when the model is in the cache; calibrated on synthetic text);
- ``saved/v1`` and ``saved/v2``: the committed ``saved-v1/`` and ``saved-v2/`` directories (written by
  ``record.py --write-saved``) loaded, their weights and logits;
- ``export/<format>``: a tiny carve exported to each stock format: every tensor and the config.

Only public API is used (``carve_``, ``calibrate``, ``carved_layers``, ``BrickFFN.select``, ``save``/``load``,
``export``), so that the same script records any commit. ``python tests/golden/record.py --out F`` writes the
digests as JSON; ``tests/test_golden.py`` compares them with ``golden.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest's synthetic_text, for the calibration text

import brickwork as bw  # noqa: E402

try:  # since carving was split from bricks
    from brickwork.bricks.state import carved_layers  # noqa: E402
    from brickwork.carving import calibrate  # noqa: E402
except ImportError:  # the recorded commit's source
    from brickwork.bricks import calibrate, carved_layers  # noqa: E402
from brickwork.grouping import GROUPING_METHODS  # noqa: E402
from brickwork.models.tiny import TINY_MODEL_TYPES, build_tiny_model, build_tiny_tokenizer  # noqa: E402
from brickwork.routing import ROUTERS  # noqa: E402
from conftest import bpe_tokenizer, synthetic_text  # noqa: E402


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(digest(state[name]).encode())
    return h.hexdigest()[:24]


def machine() -> dict:
    """What the digests depend on besides the code: the CPU's instruction sets and the library versions."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma")
    import numpy
    import transformers

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return {
        "cpu_flags": sorted(f for f in flags.split() if f in wanted),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "numba": numba_version,
        "threads": torch.get_num_threads(),
    }


def _ids(shape, seed):
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


def model_outputs(model) -> dict[str, str]:
    """The logits of one token, of 2 x 12 and of 8 x 80 tokens, and each carved layer's routing on the 2 x 12
    batch's inputs."""
    out = {}
    layers = carved_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        brick.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
        for i, brick in layers.items()
    ]
    with torch.no_grad():
        try:
            out["logits_1"] = digest(model(input_ids=_ids((1, 1), 2)).logits)
            out["logits_24"] = digest(model(input_ids=_ids((2, 12), 1)).logits)
        finally:
            for hook in hooks:
                hook.remove()
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", 80
        )
        out["logits_640"] = digest(model(input_ids=_ids((8, min(80, positions)), 3)).logits)
        for i, brick in layers.items():
            x = inputs[i].reshape(-1, inputs[i].shape[-1])
            out[f"select_{i}"] = digest(brick.select(x))
    return out


def record_battery(calib: Path, tokenizer) -> dict:
    config = dict(experts=8, shared=1, active=2, calib_tokens=256, window=32, router_samples=128)
    cases = {}
    for model_type in TINY_MODEL_TYPES:
        calibration = calibrate(
            build_tiny_model(model_type), tokenizer, calib, bw.CarveConfig(**config), progress=False
        )
        for method in sorted(GROUPING_METHODS):
            for router in sorted(ROUTERS):
                model = build_tiny_model(model_type)
                torch.manual_seed(0)
                bw.carve_(
                    model, bw.CarveConfig(**config, method=method, router=router), calibration=calibration
                )
                case = {"weights": state_digest(model.state_dict())}
                case.update(model_outputs(model))
                cases[f"battery/{model_type}/{method}/{router}"] = case
    return cases


def record_smollm2(calib: Path) -> dict:
    from brickwork.carving.presets import recommended, stock_recommended

    model, tokenizer = bw.load_model("smollm2-135m", progress=False)
    ffn = bw.find_ffns(model)[0]
    d_ff, d_model = ffn.d_ff, ffn.read().d_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {}
    common = dict(calib_tokens=2048, window=256, router_samples=1024)
    for name, config in (
        ("neuron", recommended(0.25, d_ff=d_ff, d_model=d_model, **common)),
        ("stock", stock_recommended(0.5, d_ff=d_ff, **common)),
    ):
        model.load_state_dict(state)
        torch.manual_seed(0)
        bw.carve_(model, config, calib=str(calib), tokenizer=tokenizer, progress=False)
        case = {"weights": state_digest(model.state_dict())}
        with torch.no_grad():
            case["logits_1"] = digest(model(input_ids=_ids((1, 1), 2)).logits)
            case["logits_24"] = digest(model(input_ids=_ids((2, 12), 1)).logits)
            case["logits_640"] = digest(model(input_ids=_ids((2, 320), 3)).logits)
        cases[f"smollm2/{name}"] = case
        bw.uncarve_(model)
    return cases


def _saved_model(version: int, calib: Path, tokenizer):
    model = build_tiny_model("llama")
    options = dict(
        experts=16, shared=2, active=10, router="fitted", calib_tokens=512, router_samples=256, window=64
    )
    if version == 2:  # combine fits: what format version 2 adds
        options |= dict(combine="sigmoid", combine_budgets=(0.3, 0.5))
    torch.manual_seed(0)
    bw.carve_(model, bw.CarveConfig(**options), calib=str(calib), tokenizer=tokenizer, progress=False)
    return model


def write_saved(calib: Path, tokenizer) -> None:
    for version in (1, 2):
        out = HERE / f"saved-v{version}"
        bw.save(_saved_model(version, calib, tokenizer), out, tokenizer, overwrite=True)
        meta = json.loads((out / "brickwork.json").read_text())
        assert meta["format_version"] == version, meta["format_version"]


def record_saved() -> dict:
    cases = {}
    for version in (1, 2):
        path = HERE / f"saved-v{version}"
        if not path.is_dir():
            continue
        model = bw.load(path)
        case = {"weights": state_digest(model.state_dict())}
        case.update(model_outputs(model))
        cases[f"saved/v{version}"] = case
    return cases


def _export_digests(path: Path) -> dict:
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return {
        "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24],
        "tensors": state_digest(tensors),
        "names": hashlib.sha256(" ".join(sorted(tensors)).encode()).hexdigest()[:24],
    }


def _gguf_digests(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.date":
            continue
        try:
            value = field.contents()
        except Exception:
            value = [int(x) for part in field.parts for x in part.tolist()] if field.parts else None
        fields[name] = value
    return {
        "fields": hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24],
        "tensors": state_digest(tensors),
    }


def record_exports(calib: Path, tokenizer, work: Path) -> dict:
    from brickwork.io.export import export

    cases = {}
    base = dict(
        experts=8,
        shared=1,
        active=2,
        router="fitted",
        router_options={"intercept": False},
        method="random",
        calib_tokens=512,
        router_samples=256,
        window=64,
    )
    plans = {
        "qwen2_moe": (dict(combine="softmax_topk"), tokenizer),
        "qwen2_moe-sum": (dict(), tokenizer),
        "mixtral": (dict(shared=0, active=2), tokenizer),
        "glm4_moe": (dict(combine="sigmoid"), tokenizer),
        "gguf-qwen2moe": (dict(combine="softmax"), None),
        "gguf-glm4moe": (dict(combine="sigmoid"), None),
    }
    for name, (overrides, tok) in plans.items():
        format = name.split("-")[0]
        model = build_tiny_model("llama")
        torch.manual_seed(0)
        bw.carve_(
            model, bw.CarveConfig(**(base | overrides)), calib=str(calib), tokenizer=tokenizer, progress=False
        )
        out = work / (name + (".gguf" if format == "gguf" else ""))
        exporter_tokenizer = tok or bpe_tokenizer(calib, model.config.vocab_size)
        report = export(
            model, out, format, exporter_tokenizer, validate_data=str(calib), validate_tokens=256, window=64
        )
        case = _gguf_digests(out) if format == "gguf" else _export_digests(out)
        case["temperatures"] = json.dumps({str(k): v for k, v in sorted(report.temperatures.items())})
        cases[f"export/{name}"] = case
    return cases


def record(smollm2: bool = True) -> dict:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tokenizer = build_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        calib = work / "calib.txt"
        calib.write_text(synthetic_text(3000, seed=3))
        cases = {}
        cases.update(record_battery(calib, tokenizer))
        cases.update(record_saved())
        cases.update(record_exports(calib, tokenizer, work))
        if smollm2:
            cases.update(record_smollm2(calib))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the digests here as JSON")
    parser.add_argument("--write-saved", action="store_true", help="(re)write saved-v1/ and saved-v2/ first")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--commit", default=None, help="the commit recorded, stored with the digests")
    args = parser.parse_args(argv)
    if args.write_saved:
        with tempfile.TemporaryDirectory() as work:
            calib = Path(work) / "calib.txt"
            calib.write_text(synthetic_text(3000, seed=3))
            write_saved(calib, build_tiny_tokenizer())
    result = {"commit": args.commit, "machine": machine(), "cases": record(smollm2=not args.no_smollm2)}
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
