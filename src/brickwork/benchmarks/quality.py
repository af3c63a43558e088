"""Quality against FFN weights read per token: carved configurations and neuron-level sparsity baselines.

``brickwork bench quality`` runs, on one model, with one calibration pass shared by every row:

- ``dense``, the parent;
- every construction method x router at each requested fraction, with ``experts`` equal experts of which
  ``shared`` always run (the expert-level grid); ``round(fraction * experts) - shared`` routed experts run;
- the measured neuron-level default (:func:`brickwork.carving.presets.recommended`) at each fraction;
- the neuron-level baselines of :mod:`brickwork.evaluation.baselines` (CATS, TEAL, oracle) keeping that
  fraction of neurons.

Every row is scored on the same held-out windows against the dense model's cached log-probabilities
(perplexity, its ratio to dense, mean KL(dense || row), top-1 agreement) and on the same downstream task
examples (accuracy, and agreement with the dense model's choices). Rows are compared at equal cost: the
FFN weights a token reads, router included (:attr:`CarveReport.reads`,
:meth:`NeuronSparsity.report`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from brickwork.benchmarks.common import CONFIG_KEYS
from brickwork.carving.presets import NEURON_ROUTER

logger = logging.getLogger(__name__)


HARNESSES = ("builtin", "lm-eval")


# The carving issue's routers. lowrank and partial are neuron-level predictors: on 16 experts lowrank is slow to
# fit and measured worse than fitted, and partial reads more than its fraction (bench/results/carving-quality);
# the grid leaves them out unless asked for, and partial runs at the neuron level in the default rows.
DEFAULT_ROUTERS = ("centroid", "representative", "fitted", "oracle")


def _setting(default, help: str, default_text: str | None = None):
    """A field with the help text that ``brickwork bench quality`` shows for it."""
    metadata = {"help": help} if default_text is None else {"help": help, "default_text": default_text}
    return field(default=default, metadata=metadata)


@dataclass
class QualityBenchConfig:
    model: str = _setting("smollm2-135m", "the dense model")
    fractions: tuple[float, ...] = _setting(
        (0.25, 0.5, 0.75), "reads budgets (fractions of the dense FFN weights)", "0.25 0.5 0.75"
    )
    methods: tuple[str, ...] | None = _setting(None, "construction methods of the grid", "all")
    routers: tuple[str, ...] | None = _setting(None, "routers of the grid", ", ".join(DEFAULT_ROUTERS))
    experts: int = _setting(16, "experts per FFN in the grid")
    shared: int = _setting(2, "shared experts in the grid")
    neuron_level: bool = _setting(True, "add the measured neuron-level default rows")
    stock: bool = _setting(
        False, "add the stock-exportable default (carve --stock: sigmoid experts) at each fraction"
    )
    baselines: tuple[str, ...] = _setting(
        ("cats", "teal", "oracle"), "neuron-level activation-sparsity baselines", "cats teal oracle"
    )
    calib: str = _setting("wiki", "calibration text")
    calib_tokens: int = _setting(16384, "calibration tokens")
    router_samples: int = _setting(
        8192,
        "(x, h) pairs per layer the routers fit on (memory: samples x (d_model + d_ff) x 4 bytes per layer, for "
        "all layers at once)",
    )
    eval: tuple[str, ...] = _setting(("botchan", "lee-news"), "held-out corpora", "botchan lee-news")
    eval_tokens: int = _setting(1024, "held-out tokens per corpus")
    window: int = 512
    tasks: tuple[str, ...] | None = _setting(
        None, "built-in BIG-bench task names or task.json paths", "the built-in default list"
    )
    task_examples: int = _setting(25, "examples per task")
    # lm-evaluation-harness scores the same examples, with its acc_norm and standard errors
    harness: str = _setting(
        "builtin",
        "who scores the tasks: brickwork's BIG-bench scorer or lm-evaluation-harness (accuracy ± stderr, "
        "acc_norm; pip install 'brickwork[eval]')",
    )
    seed: int = _setting(0, "seed of every carve and of the calibration sample")
    quick: bool = _setting(False, "smoke run: a tiny random model, a few windows")

    def __post_init__(self):
        from brickwork.evaluation.baselines import BASELINES
        from brickwork.grouping import GROUPING_METHODS
        from brickwork.routing import ROUTERS

        if self.quick:  # a smoke run: a tiny random model, a few windows and examples
            self.model, self.calib_tokens, self.router_samples = "tiny-llama", 1024, 512
            self.eval_tokens, self.window, self.task_examples, self.experts = 128, 64, 4, 8
            self.shared = min(self.shared, 1)
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        for name, chosen, allowed in (
            ("method", self.methods, GROUPING_METHODS),
            ("router", self.routers, ROUTERS),
            ("baseline", self.baselines, BASELINES),
        ):
            unknown = [c for c in chosen or () if c not in allowed]
            if unknown:
                raise ValueError(f"unknown {name}(s) {unknown}; choose from {', '.join(allowed)}")
        if self.eval_tokens < self.window:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) must hold one window of {self.window} tokens")
        if self.task_examples < 1:
            raise ValueError("task_examples must be at least 1")
        if self.harness not in HARNESSES:
            raise ValueError(f"harness must be one of {', '.join(HARNESSES)}, got '{self.harness}'")
        if self.experts < 1 or not 0 <= self.shared < self.experts:
            raise ValueError(
                f"experts must be >= 1 and shared in [0, experts - 1] = [0, {self.experts - 1}], got "
                f"experts {self.experts}, shared {self.shared}"
            )
        if not any(
            1 <= round(f * self.experts) - self.shared <= self.experts - self.shared for f in self.fractions
        ):
            raise ValueError(
                f"no fraction in {self.fractions} leaves a routed expert to choose with {self.experts} experts, "
                f"{self.shared} shared: the grid would be empty; lower --shared or raise the fractions"
            )


BASELINE_CALIB_TOKENS = 4096


@dataclass
class Row:
    name: str
    kind: str  # dense | carved | baseline
    config: dict
    active_fraction: float  # FFN weights read per token / dense
    heldout: dict = field(default_factory=dict)  # corpus -> metrics
    tasks: dict = field(default_factory=dict)  # task -> metrics
    seconds: dict = field(default_factory=dict)


class HeldOut:
    """Fixed held-out windows of one corpus and the dense model's log-probabilities on them, scored ``batch``
    windows at a time by :func:`brickwork.evaluation.perplexity.score_windows` (each batch's scoring holds a few
    ``[batch, window, vocab]`` float32 tensors: 2 GB each for 4 windows of 512 tokens over a 262k vocabulary, so
    large vocabularies want a smaller batch)."""

    def __init__(self, tokenizer, data: str, tokens: int, window: int, batch: int = 4):
        from brickwork.data.sources import token_windows

        self.data = data
        self.windows = token_windows(tokenizer, data, window, tokens)
        self.batch = batch
        self.dense: list[torch.Tensor] = []

    def cache_dense(self, model) -> None:
        from brickwork.evaluation.perplexity import window_logprobs

        device = next(model.parameters()).device
        self.dense = [window_logprobs(model, b.to(device)) for b in self.windows.split(self.batch)]

    def score(self, model) -> dict:
        """``model`` against the cached dense log-probabilities: perplexity, its ratio to dense, mean KL(dense ||
        model), top-1 agreement."""
        from brickwork.evaluation.perplexity import score_windows

        s = score_windows(model, self.windows, reference=self.dense, batch_size=self.batch)
        return {
            "perplexity": s.perplexity,
            "ratio": s.ratio,
            "kl": s.kl,
            "agreement": s.agreement,
            "tokens": s.tokens,
        }

    def score_dense(self) -> dict:
        """The dense row, from the cache: its perplexity, and ratio 1, KL 0, agreement 1 by definition."""
        from brickwork.evaluation.perplexity import score_logprobs

        parts = self.windows.split(self.batch)
        s = score_logprobs((b, lp, None) for b, lp in zip(parts, self.dense, strict=True))
        return {"perplexity": s.perplexity, "ratio": 1.0, "kl": 0.0, "agreement": 1.0, "tokens": s.tokens}


def _carve_configs(
    config: QualityBenchConfig, d_ff: int, d_model: int, gated: bool
) -> list[tuple[str, dict]]:
    from brickwork.carving.presets import recommended, stock_recommended
    from brickwork.grouping import GROUPING_METHODS

    methods = config.methods or tuple(GROUPING_METHODS)
    routers = config.routers or DEFAULT_ROUTERS
    out = []
    for fraction in config.fractions:
        active = round(fraction * config.experts) - config.shared
        if active < 1 or active > config.experts - config.shared:
            logger.warning(
                "fraction %s leaves no routed expert to choose with %d experts, %d shared: grid skipped",
                fraction,
                config.experts,
                config.shared,
            )
        else:
            for method in methods:
                for router in routers:
                    out.append(
                        (
                            f"{method}+{router} ({config.shared}+{active} of {config.experts})",
                            dict(
                                experts=config.experts,
                                shared=config.shared,
                                active=active,
                                method=method,
                                router=router,
                            ),
                        )
                    )
        if config.neuron_level:
            c = recommended(fraction, d_ff=d_ff, d_model=d_model, gated=gated)
            out.append(
                (
                    f"neuron+partial (default {fraction:.0%})",
                    {k: v for k, v in c.to_dict().items() if k in CONFIG_KEYS},
                )
            )
        if config.stock:
            c = stock_recommended(fraction, d_ff=d_ff)
            out.append(
                (
                    f"stock {c.combine} ({c.shared}+{c.active} of {c.experts}, default {fraction:.0%})",
                    {k: v for k, v in c.to_dict().items() if k in CONFIG_KEYS},
                )
            )
    return out


def _load(config: QualityBenchConfig):
    if config.model.startswith("tiny-"):
        from brickwork.models.tiny import build_tiny_model, build_tiny_tokenizer

        return build_tiny_model(config.model.removeprefix("tiny-")).eval(), build_tiny_tokenizer()
    from brickwork.models.loading import load_model

    return load_model(config.model)


def run_quality_bench(config: QualityBenchConfig, progress: bool = True) -> dict:
    """Every row's metrics; the returned dict is what ``results.json`` holds."""
    import brickwork as bw
    from brickwork.benchmarks.common import machine_info
    from brickwork.carving import calibrate
    from brickwork.evaluation.baselines import NeuronSparsity
    from brickwork.evaluation.tasks import DEFAULT_TASKS, load_task, score_task

    machine = machine_info()
    task_names = tuple(config.tasks) if config.tasks is not None else DEFAULT_TASKS
    tasks = [load_task(name).split("eval", config.task_examples) for name in task_names]  # errors first
    majority = {task.name: task.majority for task in tasks}
    if config.harness == "lm-eval" and tasks:
        from brickwork.evaluation.harness import require_lm_eval

        require_lm_eval()
    torch.manual_seed(config.seed)
    model, tokenizer = _load(config)
    first = bw.find_ffns(model)[0]
    heldout = [HeldOut(tokenizer, data, config.eval_tokens, config.window) for data in config.eval]

    def score_tasks() -> dict[str, tuple[dict, list[int]]]:
        """task -> (metrics, the chosen choice of each example)."""
        if config.harness == "builtin":
            results = [score_task(model, tokenizer, task) for task in tasks]
            return {r.task: (r.to_dict(), r.predictions) for r in results}
        from brickwork.evaluation.harness import evaluate_tasks

        started = time.perf_counter()
        results = evaluate_tasks(model, tokenizer, task_names, examples=config.task_examples, progress=False)
        seconds = (time.perf_counter() - started) / max(len(results), 1)
        return {
            r.task: (dict(r.to_dict(), majority=majority[r.task], seconds=seconds), r.predictions)
            for r in results
        }

    def measure(row: Row, dense_choices: dict | None) -> None:
        started = time.perf_counter()
        for h in heldout:
            row.heldout[h.data] = h.score(model) if dense_choices is not None else h.score_dense()
        for name, (metrics, predictions) in score_tasks().items():
            reference = dense_choices[name] if dense_choices is not None else predictions
            metrics["agreement"] = sum(a == b for a, b in zip(predictions, reference, strict=True)) / len(
                reference
            )
            row.tasks[name] = metrics
            if dense_choices is None:
                choices[name] = predictions
        row.seconds["evaluate"] = time.perf_counter() - started

    rows: list[Row] = []
    choices: dict[str, list[int]] = {}
    started = time.perf_counter()
    for h in heldout:
        h.cache_dense(model)
    dense = Row("dense", "dense", {}, 1.0)
    measure(dense, None)
    dense.seconds["evaluate"] = time.perf_counter() - started  # the cached log-probabilities included
    rows.append(dense)

    base = bw.CarveConfig(
        calib_tokens=config.calib_tokens,
        router_samples=config.router_samples,
        window=config.window,
        seed=config.seed,
    )
    started = time.perf_counter()
    calibration = calibrate(model, tokenizer, config.calib, base, progress=progress)
    calibration_seconds = time.perf_counter() - started

    plan: list[tuple[str, str, dict]] = [
        ("baseline", f"{kind} keep {fraction:.0%}", {"baseline": kind, "keep_fraction": fraction})
        for fraction in config.fractions
        for kind in config.baselines
    ]
    plan += [
        ("carved", name, kwargs)
        for name, kwargs in _carve_configs(config, first.d_ff, first.read().d_model, first.is_gated)
    ]
    for kind, name, kwargs in tqdm(plan, desc="bench quality", unit="row", disable=not progress):
        started = time.perf_counter()
        if kind == "baseline":
            sparsity = NeuronSparsity(model, kwargs["baseline"], kwargs["keep_fraction"])
            if kwargs["baseline"] != "oracle":
                # a quantile per layer needs far fewer tokens than grouping and routers do
                tokens = min(config.calib_tokens, BASELINE_CALIB_TOKENS)
                sparsity.calibrate(tokenizer, config.calib, tokens=tokens, window=config.window)
            row = Row(name, kind, kwargs, sparsity.report().reads)
            row.seconds["calibrate"] = time.perf_counter() - started
            with sparsity:
                measure(row, choices)
        else:
            carve = bw.CarveConfig(
                calib_tokens=config.calib_tokens,
                router_samples=config.router_samples,
                window=config.window,
                seed=config.seed,
                **kwargs,
            )
            report = bw.carve_(model, carve, calibration=calibration, progress=False)
            row = Row(name, kind, kwargs, report.reads)
            row.seconds["carve"] = time.perf_counter() - started
            try:
                measure(row, choices)
            finally:
                bw.uncarve_(model)
        rows.append(row)
        logger.info("%s: reads %.1f%%, %s", name, 100 * row.active_fraction, _brief(row))

    results = {
        "machine": machine,
        "settings": dict(
            asdict(config),
            tasks=[t.name for t in tasks],
            task_sources=list(task_names),
            calibration_seconds=calibration_seconds,
        ),
        "versions": _versions(),
        "rows": [asdict(r) for r in rows],
    }
    results["comparisons"] = compare(results)
    return results


def _brief(row: Row) -> str:
    return " ".join(f"{d} x{m['ratio']:.3f}" for d, m in row.heldout.items())


def _versions() -> dict:
    import transformers

    import brickwork

    return {
        "brickwork": brickwork.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def mean_accuracy(row: dict) -> float | None:
    values = [m["accuracy"] for m in row["tasks"].values()]
    return sum(values) / len(values) if values else None


def compare(results: dict) -> list[dict]:
    """For every baseline row: the best carved row that reads no more FFN weights, and who wins per corpus."""
    rows = results["rows"]
    carved = [r for r in rows if r["kind"] == "carved"]
    out = []
    for b in (r for r in rows if r["kind"] == "baseline"):
        cheaper = [r for r in carved if r["active_fraction"] <= b["active_fraction"] + 1e-9]
        entry = {"baseline": b["name"], "baseline_reads": b["active_fraction"], "per_corpus": {}}
        for corpus, metrics in b["heldout"].items():
            if not cheaper:
                entry["per_corpus"][corpus] = {"carved": None, "carved_wins": False}
                continue
            best = min(cheaper, key=lambda r, c=corpus: r["heldout"][c]["ratio"])
            entry["per_corpus"][corpus] = {
                "carved": best["name"],
                "carved_reads": best["active_fraction"],
                "carved_ratio": best["heldout"][corpus]["ratio"],
                "baseline_ratio": metrics["ratio"],
                "carved_wins": best["heldout"][corpus]["ratio"] < metrics["ratio"],
            }
        out.append(entry)
    return out


def _recovery_notes(results: dict) -> list[str]:
    notes = []
    for source in results.get("recovery_sources", []):
        m, s = source["machine"], source["settings"]
        notes += [
            f"Recovered rows (bench/recovery.py): commit `{m.get('commit')}`, {m.get('date')}, "
            f"{m.get('device') or m.get('cpu')}; local recovery on {s.get('local_tokens')} wiki tokens, e2e "
            f"distillation up to {max(s.get('e2e_tokens') or [0])} wiki tokens (lr {s.get('e2e_lr')}); the same "
            "held-out windows as the other rows.",
            "",
        ]
    return notes


def render_table(results: dict) -> str:
    settings, rows, m = results["settings"], results["rows"], results["machine"]
    corpora, tasks = list(settings["eval"]), list(settings["tasks"])
    dense = rows[0]
    lines = [
        f"# Quality vs FFN weights read ({settings['model']})",
        "",
        f"commit `{m['commit']}`, {m['date']}, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"calibration `{settings['calib']}` {settings['calib_tokens']} tokens "
        f"({settings['calibration_seconds']:.0f} s, shared by all carved rows); {settings['eval_tokens']} held-out "
        f"tokens per corpus in windows of {settings['window']}; {settings['task_examples']} examples per task "
        "(BIG-bench `eval` split, zero-shot, log-likelihood scoring"
        + (", lm-evaluation-harness" if settings.get("harness") == "lm-eval" else "")
        + "); seed "
        + str(settings["seed"]),
        "",
        "Dense: "
        + "; ".join(
            filter(
                None,
                [
                    ", ".join(f"{c} perplexity {dense['heldout'][c]['perplexity']:.2f}" for c in corpora),
                    ", ".join(
                        f"{t} {dense['tasks'][t]['accuracy']:.1%} (chance {dense['tasks'][t]['chance']:.1%})"
                        for t in tasks
                    ),
                ],
            )
        ),
        "",
        *_recovery_notes(results),
        "Perplexity ratio to dense (KL nats/token, top-1 agreement); task accuracy; FFN weights read per token "
        "(router included).",
        "",
        "| "
        + " | ".join(["row", "reads", *(f"{c} ratio (KL, agree)" for c in corpora), *tasks, "mean acc", "s"])
        + " |",
        "|---|---:|" + "---:|" * (len(corpora) + len(tasks) + 2),
    ]
    order = sorted(rows[1:], key=lambda r: (r["active_fraction"], r["heldout"][corpora[0]]["ratio"]))
    for r in [dense, *order]:
        heldout = " | ".join(
            f"x{r['heldout'][c]['ratio']:.3f} ({r['heldout'][c]['kl']:.3f}, {r['heldout'][c]['agreement']:.0%})"
            for c in corpora
        )
        accuracy = " | ".join(f"{r['tasks'][t]['accuracy']:.1%}" if t in r["tasks"] else "-" for t in tasks)
        mean = mean_accuracy(r)
        lines.append(
            f"| {r['name']} | {r['active_fraction']:.1%} | {heldout} | {accuracy}"
            + (" | " if tasks else "")
            + (f"{mean:.1%}" if mean is not None else "-")
            + f" | {sum(r['seconds'].values()):.0f} |"
        )
    lines += ["", "## Carved vs baselines at equal FFN weight reads", ""]
    lines += [
        "| baseline | reads | corpus | baseline ratio | best carved row reading no more | reads | ratio | winner |"
    ]
    lines += ["|---|---:|---|---:|---|---:|---:|---|"]
    for c in results["comparisons"]:
        for corpus, p in c["per_corpus"].items():
            if p["carved"] is None:
                lines.append(
                    f"| {c['baseline']} | {c['baseline_reads']:.1%} | {corpus} | - | none reads that little | | | baseline |"
                )
                continue
            lines.append(
                f"| {c['baseline']} | {c['baseline_reads']:.1%} | {corpus} | x{p['baseline_ratio']:.3f} | "
                f"{p['carved']} | {p['carved_reads']:.1%} | x{p['carved_ratio']:.3f} | "
                f"{'carved' if p['carved_wins'] else 'baseline'} |"
            )
    return "\n".join(lines)


def _series(row: dict) -> str:
    if row["kind"] == "recovered":
        return f"recovered ({row['config']['recovery']})"
    if row["kind"] == "baseline":
        return f"baseline: {row['config']['baseline']}"
    if row["kind"] == "dense":
        return "dense"
    c = row["config"]
    if c["experts"] >= 512 or c["router"] == NEURON_ROUTER and "neuron" in row["name"]:
        return "carved: neuron-level default (partial router)"
    if c.get("combine", "sum") != "sum":
        return f"carved: stock default ({c['combine']} experts)"
    return f"carved: {c['method']} + {c['router']}"


def plot(results: dict, path: Path) -> None:
    """One panel per held-out corpus (perplexity ratio, log scale) and one for mean task accuracy, against
    FFN weights read; one line per method x router and per baseline; the Pareto front drawn in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    corpora = list(results["settings"]["eval"])
    panels = [(c, lambda r, c=c: r["heldout"][c]["ratio"], True) for c in corpora]
    if results["settings"]["tasks"]:
        panels.append(("mean task accuracy", mean_accuracy, False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 4, 6), squeeze=False)
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_series(r), []).append(r)
    routers = sorted({r["config"]["router"] for r in rows if r["kind"] == "carved"})
    methods = sorted({r["config"]["method"] for r in rows if r["kind"] == "carved"})
    colours = dict(zip(routers, plt.get_cmap("tab10").colors, strict=False))
    markers = dict(zip(methods, "o^vsPX*", strict=False))
    baseline_colours = {"cats": "#444444", "teal": "#b8860b", "oracle": "#8b0000"}
    for ax, (title, value, lower_better) in zip(axes[0], panels, strict=True):
        for label, members in sorted(series.items()):
            members = sorted((r for r in members if value(r) is not None), key=lambda r: r["active_fraction"])
            if not members:
                continue
            xs, ys = [r["active_fraction"] for r in members], [value(r) for r in members]
            c = members[0]["config"]
            if label == "dense":
                ax.axhline(ys[0], color="black", linewidth=0.8, label="dense")
                continue
            if label.startswith("recovered"):
                style = dict(marker="*", linestyle="none", color="#2ca02c" if "local" in label else "#17becf")
            elif label.startswith("baseline"):
                style = dict(
                    marker="s", linestyle="--", linewidth=2, color=baseline_colours.get(c["baseline"])
                )
            elif "neuron-level" in label:
                style = dict(marker="D", linestyle="-", linewidth=2.4, color="#e377c2")
            else:
                style = dict(
                    marker=markers[c["method"]],
                    linestyle=":",
                    linewidth=1,
                    color=colours[c["router"]],
                    alpha=0.8,
                )
            ax.plot(xs, ys, markersize=5, label=label, **style)
        front = _pareto(
            [r for r in rows if r["kind"] != "dense" and value(r) is not None], value, lower_better
        )
        ax.plot(
            [r["active_fraction"] for r in front],
            [value(r) for r in front],
            color="black",
            linewidth=0.6,
            alpha=0.6,
            drawstyle="steps-post",
            label="Pareto front",
        )
        if lower_better:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity / dense (log)")
        else:
            ax.set_ylabel("accuracy")
        ax.set_xlabel("FFN weights read per token (fraction of dense, router included)")
        ax.set_title(f"{title} ({'lower' if lower_better else 'higher'} is better)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        fontsize=7,
        loc="center right",
        title="colour: router, marker: method",
        title_fontsize=7,
    )
    fig.suptitle(f"brickwork bench quality: {results['settings']['model']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto(rows: list[dict], value, lower_better: bool) -> list[dict]:
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["active_fraction"], value(r) if lower_better else -value(r))):
        score = value(r) if lower_better else -value(r)
        if score < best:
            front.append(r)
            best = score
    return front


def _token_label(tokens: int) -> str:
    return f"{tokens / 2**20:g}M" if tokens >= 2**20 else f"{tokens / 2**10:g}k"


def merge_recovery(results: dict, *recoveries: dict) -> dict:
    """``results`` with the rows of recovery runs (bench/recovery.py) added as kind ``recovered``: the same
    configurations after local (and e2e) recovery, scored on the same held-out windows (no task accuracy).

    A configuration's local row comes from the first run that has it; every run's e2e result is a row named
    with its token budget. Merging again replaces earlier recovered rows."""
    merged = dict(results, rows=[r for r in results["rows"] if r["kind"] != "recovered"])
    names = set()
    for recovery in recoveries:
        device = recovery["machine"].get("device") or recovery["machine"].get("cpu", "")
        for row in recovery["rows"]:
            stages = [("local", row["local"])]
            if "e2e" in row:
                stages.append((f"local + e2e {_token_label(row['e2e'].get('tokens', 0))}", row["e2e"]))
            for stage, data in stages:
                name = f"{row['name']} + {stage} recovery"
                if name in names:
                    continue
                names.add(name)
                merged["rows"].append(
                    {
                        "name": name,
                        "kind": "recovered",
                        "config": dict(row["config"], recovery="local" if stage == "local" else "e2e"),
                        "active_fraction": row["active_fraction"],
                        "heldout": data["heldout"],
                        "tasks": {},
                        "seconds": {"recover": data["seconds"]},
                        "device": device,
                    }
                )
    merged["recovery_sources"] = [{"machine": r["machine"], "settings": r["settings"]} for r in recoveries]
    merged.pop("recovery_source", None)
    return merged


def write(results: dict, out: Path, overwrite: bool = False) -> Path:
    """results.json, results.md and quality.png in ``out``, together and atomically (other files there are kept);
    a non-empty ``out`` that holds no results is replaced only with ``overwrite``."""
    from brickwork.benchmarks.common import write_results
    from brickwork.io_utils import updated_directory

    with updated_directory(out, "bench", overwrite) as tmp:  # all three files appear at once
        write_results(tmp, results, render_table(results))
        plot(results, tmp / "quality.png")
    return out
