"""Speed of carved models against their dense parent, measured as ratios in one run.

``brickwork bench speed`` keeps the dense model and a carved copy in memory and, for each measurement,
alternates dense and carved runs (``repeats`` of each, interleaved) and reports the ratio of the medians
(dense time / carved time: above 1 is faster). Measurements:

- FFN only: the model's FFN modules alone, on the inputs they see in a real forward pass (captured once), for
  batch-1 decode (one token), batch 4/16 decode (one token per sequence) and prefill of 128/512 tokens;
- end to end: batch-1 and batch-B decode steps with a KV cache (tokens/s) and prefill forwards;
- the FFN's share of dense batch-1 decode time;
- switch points: per carved configuration and token count, which of the kernel paths (per-token, batch,
  grouped, reference) is fastest, from FFN-only times; :data:`brickwork.bricks.paths.SWITCH_POINTS` is set from
  these.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class SpeedBenchConfig:
    # (the fields with help text are the options of ``brickwork bench speed``)
    model: str = field(default="smollm2-135m", metadata={"help": "the dense model"})
    fractions: tuple[float, ...] = field(
        default=(0.25, 0.5), metadata={"help": "active fractions", "default_text": "0.25 0.5"}
    )
    repeats: int = field(default=7, metadata={"help": "interleaved repeats per measurement"})
    decode_steps: int = 16
    prefill: tuple[int, ...] = (128, 512)
    batches: tuple[int, ...] = (4, 16)
    switch_tokens: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 512)
    calib: str = "wiki"
    calib_tokens: int = 8192
    seed: int = 0
    quick: bool = field(default=False, metadata={"help": "smoke run on a tiny random model"})

    def __post_init__(self):
        if self.quick:
            self.model, self.calib_tokens, self.repeats, self.decode_steps = "tiny-llama", 1024, 3, 4
            self.prefill, self.batches, self.switch_tokens = (32,), (4,), (1, 4, 16)
        if self.repeats < 1 or self.decode_steps < 1:
            raise ValueError("repeats and decode_steps must be at least 1")
        if not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1), got {self.fractions}")


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn ``repeats`` times (after one warm-up each). A callable that
    returns a number times itself (the part of its work that counts); otherwise its whole call is timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            own = fn()
            times[name].append(time.perf_counter() - started if own is None else own)
    return {name: statistics.median(values) for name, values in times.items()}


def _ffn_inputs(model, ids: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Each FFN module and the input it receives for ``ids`` (captured from one forward)."""
    from brickwork.models.specs import find_ffns

    captured = []
    handles = []
    for ffn in find_ffns(model):
        module = ffn.module

        def hook(mod, args, module=module):
            captured.append((module, args[0].detach().clone()))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _run_ffns(pairs) -> None:
    with torch.no_grad():
        for module, x in pairs:
            module(x)


def _carved_pairs(dense, carved, dense_pairs):
    """The carved model's modules at the dense FFNs' places, with the same inputs."""
    names = {module: name for name, module in dense.named_modules()}
    return [(carved.get_submodule(names[m]), x) for m, x in dense_pairs]


def _decode_steps(model, prompt: torch.Tensor, steps: int):
    """A callable returning the seconds per step of ``steps`` single-token forwards with a KV cache (the
    prompt's prefill is untimed)."""

    def run() -> float:
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - started) / steps

    return run


# The per-token path costs about tokens x its one-token time: beyond this many tokens it is not timed.
TOKEN_PATH_MAX = 64


def _switch_points(bricks, dense_ffns, tokens_list, repeats) -> dict:
    """FFN-only time per token count of each kernel path, of the path the bricks pick (``auto``) and of the dense
    FFNs on the same inputs; the fastest kernel path per count."""
    from brickwork.bricks import paths as kernels

    def over(inputs, fn):
        def run():
            with torch.no_grad():
                for b, x in inputs:
                    fn(b, x)

        return run

    table = {}
    for tokens in tokens_list:
        inputs = [(b, torch.randn(tokens, b.d_model)) for b in bricks]
        paths = {}
        if tokens <= TOKEN_PATH_MAX:
            paths["token"] = over(inputs, kernels.tokens_forward)
        paths["batch"] = over(inputs, kernels.batch_forward)
        first = bricks[0]
        if first.down_keep is None and first.expert_size > 1:
            paths["grouped"] = over(inputs, kernels.grouped_forward)
        paths["reference"] = over(inputs, lambda b, x: b.forward_reference(x))
        paths["auto"] = over(inputs, lambda b, x: b(x))
        dense_inputs = [(f, x) for f, (_, x) in zip(dense_ffns, inputs, strict=True)]
        paths["dense"] = over(dense_inputs, lambda f, x: f(x))
        times = _interleaved(paths, repeats)
        kernel_paths = {k: v for k, v in times.items() if k not in ("auto", "dense")}
        table[tokens] = {
            "seconds": times,
            "fastest": min(kernel_paths, key=kernel_paths.get),
            "auto_speedup": times["dense"] / times["auto"],
        }
    return table


def _configs(config: SpeedBenchConfig, d_ff: int, d_model: int, gated: bool) -> dict[str, dict]:
    from brickwork.carving.presets import recommended

    out = {}
    for fraction in config.fractions:
        experts = 16 if d_ff % 16 == 0 else 8
        active = max(1, round(fraction * experts) - 2)
        out[f"experts {fraction:.0%}"] = dict(
            experts=experts, shared=2, active=active, method="activation", router="fitted"
        )
        c = recommended(fraction, d_ff=d_ff, d_model=d_model, gated=gated)
        out[f"neurons {fraction:.0%}"] = {
            k: v
            for k, v in c.to_dict().items()
            if k in ("experts", "shared", "active", "method", "router", "router_options", "down_fraction")
        }
    return out


def run_speed_bench(config: SpeedBenchConfig, progress: bool = True) -> dict:
    import brickwork as bw
    from brickwork.benchmarks.common import machine_info
    from brickwork.benchmarks.quality import _load
    from brickwork.bricks.state import carved_layers
    from brickwork.carving import calibrate

    machine = machine_info()
    torch.manual_seed(config.seed)
    dense, tokenizer = _load(config)
    dense.eval()
    first = bw.find_ffns(dense)[0]
    base = bw.CarveConfig(calib_tokens=config.calib_tokens, seed=config.seed)
    calibration = calibrate(dense, tokenizer, config.calib, base, progress=progress)
    vocab = dense.config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)

    def ids(batch, length):
        return torch.randint(3, vocab, (batch, length), generator=generator)

    # Inputs of the FFNs as they are in a real forward (the dense model's), for each shape measured.
    shapes = {"decode b1": ids(1, 1), **{f"decode b{b}": ids(b, 1) for b in config.batches}}
    shapes.update({f"prefill {t}": ids(1, t) for t in config.prefill})
    dense_pairs = {name: _ffn_inputs(dense, x) for name, x in shapes.items()}
    # One distinct 16-token prompt per sequence: identical sequences would route alike and hide what batching
    # costs a carved model (the union of the experts its tokens select).
    prompts = {batch: ids(batch, 16) for batch in (1, *config.batches)}
    results_rows = []
    dense_decode = None
    for name, kwargs in _configs(config, first.d_ff, first.read().d_model, first.is_gated).items():
        carved = copy.deepcopy(dense)
        carve = bw.CarveConfig(calib_tokens=config.calib_tokens, seed=config.seed, **kwargs)
        report = bw.carve_(carved, carve, calibration=calibration, progress=False)
        carved.eval()
        row = {
            "name": name,
            "config": kwargs,
            "active_fraction": report.reads,
            "ffn": {},
            "e2e": {},
        }
        for shape, pairs in dense_pairs.items():
            carved_pairs = _carved_pairs(dense, carved, pairs)
            t = _interleaved(
                {"dense": lambda p=pairs: _run_ffns(p), "carved": lambda p=carved_pairs: _run_ffns(p)},
                config.repeats,
            )
            row["ffn"][shape] = {
                "dense_s": t["dense"],
                "carved_s": t["carved"],
                "speedup": t["dense"] / t["carved"],
            }
        for batch in (1, *config.batches):
            batch_prompt = prompts[batch]
            t = _interleaved(
                {
                    name: _decode_steps(m, batch_prompt, config.decode_steps)
                    for name, m in (("dense", dense), ("carved", carved))
                },
                config.repeats,
            )
            row["e2e"][f"decode b{batch}"] = {
                "dense_s": t["dense"],
                "carved_s": t["carved"],
                "speedup": t["dense"] / t["carved"],
                "dense_tokens_per_s": batch / t["dense"],
                "carved_tokens_per_s": batch / t["carved"],
            }
            if batch == 1:
                dense_decode = t["dense"]
        for length in config.prefill:
            x = shapes[f"prefill {length}"]

            def fwd(model, x=x):
                with torch.no_grad():
                    model(input_ids=x)

            t = _interleaved({"dense": lambda: fwd(dense), "carved": lambda c=carved: fwd(c)}, config.repeats)
            row["e2e"][f"prefill {length}"] = {
                "dense_s": t["dense"],
                "carved_s": t["carved"],
                "speedup": t["dense"] / t["carved"],
            }
        names = {module: name for name, module in carved.named_modules()}
        bricks = list(carved_layers(carved).values())
        dense_ffns = [dense.get_submodule(names[b]) for b in bricks]
        row["switch"] = _switch_points(bricks, dense_ffns, config.switch_tokens, max(3, config.repeats // 2))
        results_rows.append(row)
        logger.info(
            "%s: FFN decode x%.2f, e2e decode x%.2f",
            name,
            row["ffn"]["decode b1"]["speedup"],
            row["e2e"]["decode b1"]["speedup"],
        )
        carved = None  # free it before the next configuration is built
    ffn_share = (
        statistics.median(r["ffn"]["decode b1"]["dense_s"] / dense_decode for r in results_rows)
        if dense_decode
        else None
    )
    return {
        "machine": machine,
        "settings": dict(asdict(config), calibration_tokens=config.calib_tokens),
        "ffn_share_of_dense_decode": ffn_share,
        "rows": results_rows,
    }


def render_table(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    rows = results["rows"]
    shapes = list(rows[0]["ffn"])
    e2e = list(rows[0]["e2e"])
    lines = [
        f"# Speed: carved vs dense ({s['model']})",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, fp32; "
        f"medians of {s['repeats']} interleaved repeats; decode: {s['decode_steps']} steps with a KV cache after a "
        "16-token prompt (a different one per sequence). Speed-up = dense time / carved time.",
        "",
        f"FFN share of dense batch-1 decode time: {results['ffn_share_of_dense_decode']:.0%}",
        "",
        "| configuration | FFN reads | "
        + " | ".join(f"FFN {x}" for x in shapes)
        + " | "
        + " | ".join(f"e2e {x}" for x in e2e)
        + " |",
        "|---|---:|" + "---:|" * (len(shapes) + len(e2e)),
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['active_fraction']:.1%} | "
            + " | ".join(f"x{r['ffn'][x]['speedup']:.2f}" for x in shapes)
            + " | "
            + " | ".join(f"x{r['e2e'][x]['speedup']:.2f}" for x in e2e)
            + " |"
        )
    lines += ["", "Batch-1 decode tokens/s (dense / carved):", ""]
    for r in rows:
        d = r["e2e"]["decode b1"]
        lines.append(f"- {r['name']}: {d['dense_tokens_per_s']:.1f} / {d['carved_tokens_per_s']:.1f}")
    lines += [
        "",
        "## Kernel paths: FFN-only ms per call (all layers) by token count",
        "",
        "Fastest kernel path in bold; `auto`: the path the carved model picks (SWITCH_POINTS), `dense`: the dense "
        "FFNs on the same inputs. The plot (speed.png) shows dense / auto.",
        "",
    ]
    for r in rows:
        lines.append(
            f"**{r['name']}**: "
            + "; ".join(
                f"{t} tok: "
                + ", ".join(
                    (f"**{p} {v * 1e3:.1f}**" if p == e["fastest"] else f"{p} {v * 1e3:.1f}")
                    for p, v in e["seconds"].items()
                )
                + f" (x{e['auto_speedup']:.2f})"
                for t, e in r["switch"].items()
            )
        )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """FFN-only speed-up over dense of the path each carved model picks, against the number of tokens per
    call (1 = batch-1 decode; batches and prefills beyond)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["rows"]:
        tokens = [int(t) for t in r["switch"]]
        ax.plot(tokens, [e["auto_speedup"] for e in r["switch"].values()], marker="o", label=r["name"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call (decode batch or prefill length)")
    ax.set_ylabel("FFN speed-up over dense (dense time / carved time)")
    m = results["machine"]
    ax.set_title(
        f"{results['settings']['model']}, {m['cpu']}, {m['torch_threads']} threads, commit {m['commit'][:7]}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out, overwrite: bool = False) -> None:
    """results.json, results.md and speed.png in ``out``, together and atomically (other files there are kept);
    a non-empty ``out`` that holds no results is replaced only with ``overwrite``."""
    from brickwork.benchmarks.common import write_results
    from brickwork.io_utils import updated_directory

    with updated_directory(out, "bench", overwrite) as tmp:  # all three files appear at once
        write_results(tmp, results, render_table(results))
        plot(results, tmp / "speed.png")
