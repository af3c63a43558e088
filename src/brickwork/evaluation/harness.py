"""Downstream tasks through EleutherAI's lm-evaluation-harness (``pip install 'brickwork[eval]'``).

The model is passed in memory (``HFLM(pretrained=model, tokenizer=tokenizer)``): a carved model is an ordinary
transformers model whose FFN modules were replaced, so nothing is saved or reloaded. Tasks come from local
files only, unless the caller allows the Hugging Face hub:

- ``bigbench`` (the built-in default task list) or a built-in BIG-bench task name or a BIG-bench-style
  ``task.json`` path: brickwork writes the examples of the task's ``eval`` part (the same seeded split that
  :mod:`brickwork.evaluation.tasks` scores, all of it unless ``examples`` caps it) to a JSONL file and an
  lm-eval task YAML over it (``dataset_path: json``), zero-shot, ``acc`` and ``acc_norm``;
- a task YAML file or a directory of them (lm-eval's ``include_path``): the tasks defined there;
- any other name: an lm-eval task, group or tag (its dataset must be in the local Hugging Face cache unless
  ``allow_hub``).

How the harness scores the BIG-bench tasks, compared with :func:`brickwork.evaluation.tasks.score_task`
(both sum the log-probabilities of each choice's tokens given the prompt and take the argmax):

- ``acc`` counts an example as right when the chosen answer has the example's highest target score;
  ``score_task`` credits the chosen answer's target score. They agree on tasks whose scores are 0/1 with one
  right answer (every built-in task except ``emojis_emotion_prediction``, whose scores are fractional);
- the harness tokenises prompt + choice together and splits at the prompt's token count; brickwork tokenises
  them apart. Tokenisers that merge across that boundary give slightly different log-probabilities;
- the harness moves all trailing whitespace of the prompt into the choice, brickwork only trailing spaces: for
  prompts ending in a newline the newline's log-probability is added to every choice alike (argmax unchanged
  when the newline is a token of its own);
- the harness adds the tokeniser's special tokens (a BOS for Llama-style tokenisers); brickwork adds none;
- ``acc_stderr`` is the sample standard deviation over sqrt(n) (``score_task``'s ``stderr`` uses the
  population one: a factor sqrt(n / (n - 1)) apart).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brickwork.errors import BrickworkError
from brickwork.evaluation.tasks import (
    CANDIDATE_TASKS,
    DEFAULT_TASKS,
    MultipleChoiceTask,
    load_task,
    score_task,
)

logger = logging.getLogger(__name__)

BIGBENCH_ALIAS = "bigbench"  # the built-in default task list
INSTALL_HINT = "pip install 'brickwork[eval]'"
DEFAULT_BATCH_SIZE = 16  # lm-eval requests per forward pass
TASK_PREFIX = (
    "brickwork_"  # lm-eval names of the generated BIG-bench tasks, apart from lm-eval's own bigbench_*
)


@dataclass
class HarnessTaskResult:
    """One task's figures from lm-eval. ``accuracy``/``stderr`` are lm-eval's ``acc``/``acc_stderr``;
    ``chance`` is known for BIG-bench tasks only."""

    task: str
    examples: int
    accuracy: float | None
    stderr: float | None
    accuracy_norm: float | None = None
    stderr_norm: float | None = None
    chance: float | None = None
    source: str = "lm-eval"  # "bigbench" (generated from brickwork's task files), "yaml" or "lm-eval"
    harness: str = "lm-eval"  # or "builtin" (brickwork.evaluation.tasks.score_task)
    metrics: dict[str, float] = field(default_factory=dict)  # every numeric figure lm-eval reported
    predictions: list[int] | None = None  # the chosen choice of each example (multiple-choice tasks)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["predictions"]
        return out


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise BrickworkError(
            f"lm-evaluation-harness is not installed ({exc}); {INSTALL_HINT}, or use the built-in scorer "
            "(--harness builtin) for BIG-bench tasks"
        ) from exc


# --- BIG-bench tasks as lm-eval tasks ------------------------------------------------------------------
def _bigbench_docs(task: MultipleChoiceTask) -> tuple[list[dict], str]:
    """JSONL documents of ``task`` and the target delimiter: a space that ends every prompt becomes the
    delimiter (lm-eval's convention); prompts that end otherwise keep their text and the delimiter is empty."""
    if all(e.prompt.endswith(" ") for e in task.examples):
        delimiter = " "
    elif not any(e.prompt.endswith(" ") for e in task.examples):
        delimiter = ""
    else:  # mixed endings: each choice carries its own prompt's space
        delimiter = None
    docs = []
    for e in task.examples:
        prompt, lead = e.prompt, ""
        if delimiter is not None and delimiter:
            prompt = prompt[: -len(delimiter)]
        elif delimiter is None and prompt.endswith(" "):
            prompt, lead = prompt.rstrip(" "), " "
        best = max(e.scores)
        docs.append(
            {
                "prompt": prompt,
                "choices": [lead + c for c in e.choices],
                "gold": [i for i, s in enumerate(e.scores) if s == best],
            }
        )
    return docs, delimiter or ""


def write_bigbench_tasks(tasks: list[MultipleChoiceTask], directory: str | Path) -> dict[str, str]:
    """Write each task's examples (JSONL) and an lm-eval task YAML over them into ``directory``.

    Returns ``{lm-eval task name: brickwork task name}``. The YAMLs are lm-eval's own format, so
    ``lm_eval --include_path DIRECTORY --tasks brickwork_<name>`` runs them too.
    """
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        name = TASK_PREFIX + task.name
        docs, delimiter = _bigbench_docs(task)
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        config = {
            "task": name,
            "dataset_path": "json",
            # a cache beside the data, so loading never writes to (or reads from) the user's datasets cache
            "dataset_kwargs": {
                "data_files": {"test": str(data.resolve())},
                "cache_dir": str(directory / "cache"),
            },
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": "prompt",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": delimiter,
            "num_fewshot": 0,
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": 1.0, "source": f"brickwork BIG-bench task '{task.name}', eval part"},
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        names[name] = task.name
    return names


# --- resolving task specs ------------------------------------------------------------------------------
@dataclass
class _Plan:
    bigbench: list[MultipleChoiceTask] = field(default_factory=list)
    yaml_paths: list[Path] = field(default_factory=list)  # files and directories given by path
    names: list[str] = field(default_factory=list)  # lm-eval names (found in yaml_paths or lm-eval's own)


def split_task_specs(specs: list[str] | tuple[str, ...]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (lm-eval's comma lists and space-separated lists both work)."""
    return [part.strip() for spec in specs for part in str(spec).split(",") if part.strip()]


def is_bigbench_spec(spec: str) -> bool:
    path = Path(spec).expanduser()
    return spec == BIGBENCH_ALIAS or spec in CANDIDATE_TASKS or (path.suffix == ".json" and path.is_file())


def _plan(specs: list[str], examples: int | None) -> _Plan:
    plan = _Plan()
    for spec in specs:
        path = Path(spec).expanduser()
        if spec == BIGBENCH_ALIAS:
            plan.bigbench += [load_task(name).split("eval", examples) for name in DEFAULT_TASKS]
        elif is_bigbench_spec(spec):
            plan.bigbench.append(load_task(spec).split("eval", examples))
        elif path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise BrickworkError(f"task file {path} does not exist")
            plan.yaml_paths.append(path.resolve())
        elif path.suffix == ".json":
            raise BrickworkError(f"task file {path} does not exist")
        else:
            plan.names.append(spec)
    seen = [t.name for t in plan.bigbench]
    if len(set(seen)) != len(seen):
        raise BrickworkError(f"a BIG-bench task is named twice in {specs}")
    return plan


def _task_manager(include: list[Path], defaults: bool):
    roots = tuple(sorted({str(p if p.is_dir() else p.parent) for p in include}))
    if defaults and not roots:
        return _default_task_manager()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(roots) or None, include_defaults=defaults)


@functools.lru_cache(maxsize=1)
def _default_task_manager():
    """lm-eval's own tasks, indexed once per process (~10 s: thousands of YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _yaml_task_names(manager, path: Path) -> list[str]:
    """The tasks a YAML file defines, or every task defined under a directory."""
    from lm_eval.tasks._index import Kind

    found = []
    for name, entry in manager.task_index.items():
        if entry.yaml_path is None or entry.kind not in (Kind.TASK, Kind.PY_TASK, Kind.GROUP):
            continue
        where = Path(entry.yaml_path).resolve()
        if where == path or (path.is_dir() and path in where.parents):
            found.append(name)
    if not found:
        raise BrickworkError(f"{path} defines no lm-eval task (a YAML with a 'task:' key)")
    if (
        path.is_dir()
    ):  # a directory: its tasks (so none runs twice through a group), its groups if nothing else
        found = [n for n in found if manager.task_index[n].kind != Kind.GROUP] or found
    return sorted(found)


# --- running -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hub_access(allowed: bool):
    """Offline unless ``allowed``: the hub and datasets libraries read their offline flags at import, so
    the flags are set in the environment and in the imported modules, and restored afterwards."""
    if allowed:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    values = [getattr(module, attr) for module, attr in saved]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for module, attr in saved:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for (module, attr), value in zip(saved, values, strict=True):
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _offline_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the hub refusing a download in offline mode."""
    for _ in range(8):  # the chain of causes, bounded
        if exc is None:
            return False
        text = f"{type(exc).__name__}: {exc}".lower()
        if any(s in text for s in ("offline", "couldn't reach", "localentrynotfound")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _figures(results: dict, name: str) -> dict[str, float]:
    out = {}
    for key, value in results.get(name, {}).items():
        metric, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len":
            out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# evaluate_tasks' options as ``brickwork eval --tasks`` shows them (the defaults are the signature's).
EVALUATE_TASKS_HELP = {
    "examples": {
        "help": "examples per task",
        "default_text": "all of a BIG-bench task's eval half; all of an lm-eval task",
    },
    "batch_size": "lm-eval requests per forward pass",
    "allow_hub": "let lm-eval download task datasets from the Hugging Face hub",
}


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = (BIGBENCH_ALIAS,),
    examples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    allow_hub: bool = False,
    progress: bool = True,
    work_dir: str | Path | None = None,
) -> list[HarnessTaskResult]:
    """Evaluate ``model`` (in memory) on ``tasks`` with ``lm_eval.simple_evaluate``, zero-shot.

    ``tasks``: ``bigbench``, built-in BIG-bench names, BIG-bench ``task.json`` paths, task YAML files or
    directories, lm-eval task names (comma lists allowed). ``examples``: per task, the first ``examples`` of
    a BIG-bench task's eval part (default all of it) and lm-eval's ``limit`` for the others (default all).
    ``work_dir``: where the generated BIG-bench task files go (default a temporary directory).
    """
    if examples is not None and examples < 1:
        raise BrickworkError(f"examples must be at least 1, got {examples}")
    if batch_size < 1:
        raise BrickworkError(f"batch_size must be at least 1, got {batch_size}")
    specs = split_task_specs(tasks)
    if not specs:
        raise BrickworkError(f"no tasks given; use '{BIGBENCH_ALIAS}' for the built-in BIG-bench tasks")
    require_lm_eval()
    plan = _plan(specs, examples)  # task files read (and a missing one reported) before lm-eval runs
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="brickwork-lm-eval-"))
        return _run(model, tokenizer, plan, Path(work_dir), examples, batch_size, allow_hub, progress)


def _run(model, tokenizer, plan: _Plan, work_dir: Path, examples, batch_size, allow_hub, progress):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not progress:
        import datasets

        datasets.disable_progress_bars()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    generated = write_bigbench_tasks(plan.bigbench, work_dir / "tasks") if plan.bigbench else {}
    include = plan.yaml_paths + ([work_dir / "tasks"] if generated else [])
    manager = _task_manager(include, defaults=False)
    sources = dict.fromkeys(generated, "bigbench")
    for path in plan.yaml_paths:
        sources |= dict.fromkeys(_yaml_task_names(manager, path), "yaml")
    unknown = [n for n in plan.names if n not in manager.all_tasks]
    if unknown:  # lm-eval's own tasks: indexing them all takes ~10 s, so only when asked for
        manager = _task_manager(include, defaults=True)
        missing = [n for n in unknown if n not in manager.all_tasks]
        if missing:
            raise BrickworkError(
                f"unknown task(s) {missing}: not '{BIGBENCH_ALIAS}', a built-in BIG-bench task "
                f"({', '.join(CANDIDATE_TASKS)}), a task.json/YAML path or an lm-eval task name "
                "(`lm_eval ls tasks` lists those)"
            )
    sources |= {n: sources.get(n, "lm-eval") for n in plan.names}
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    started = time.perf_counter()
    with hub_access(allow_hub):
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(sources),
                task_manager=manager,
                limit=examples,  # a no-op for the BIG-bench tasks, already cut to `examples` of their eval part
                log_samples=True,
            )
        except Exception as exc:
            if not allow_hub and _offline_error(exc):
                raise BrickworkError(
                    f"a task's dataset is not available offline ({type(exc).__name__}: {exc}). brickwork "
                    "evaluates without the Hugging Face hub by default: put the dataset in the local cache, "
                    "point the task at local files, or allow downloads (--hub / allow_hub=True)"
                ) from exc
            raise
    seconds = time.perf_counter() - started
    logger.info("lm-eval ran %d task(s) in %.1f s", len(sources), seconds)
    by_name = {TASK_PREFIX + t.name: t for t in plan.bigbench}
    results = []
    for name, figures in ((n, _figures(out["results"], n)) for n in out["results"]):
        samples = out.get("samples", {}).get(name)
        predictions = None
        if samples and all(len(s.get("filtered_resps", [])) > 1 for s in samples):
            order = sorted(samples, key=lambda s: s["doc_id"])
            predictions = [
                max(range(len(s["filtered_resps"])), key=lambda i, s=s: s["filtered_resps"][i][0])
                for s in order
            ]
        count = out.get("n-samples", {}).get(name, {}).get("effective") or (len(samples) if samples else 0)
        task = by_name.get(name)
        results.append(
            HarnessTaskResult(
                task=generated.get(name, name),
                examples=int(count),
                accuracy=figures.get("acc"),
                stderr=_finite(figures.get("acc_stderr")),
                accuracy_norm=figures.get("acc_norm"),
                stderr_norm=_finite(figures.get("acc_norm_stderr")),
                chance=task.chance if task is not None else None,
                source=sources.get(name, "lm-eval"),
                metrics=figures,
                predictions=predictions,
            )
        )
    return results


def evaluate_builtin(
    model, tokenizer, tasks: list[str] | tuple[str, ...] = (BIGBENCH_ALIAS,), examples: int | None = None
) -> list[HarnessTaskResult]:
    """The same BIG-bench task specs scored by brickwork's own scorer (:func:`score_task`), no lm-eval."""
    specs = split_task_specs(tasks)
    if not specs:
        raise BrickworkError(f"no tasks given; use '{BIGBENCH_ALIAS}' for the built-in BIG-bench tasks")
    other = [s for s in specs if not is_bigbench_spec(s)]
    if other:
        raise BrickworkError(
            f"the builtin scorer runs BIG-bench tasks only ('{BIGBENCH_ALIAS}', built-in names, task.json "
            f"paths), not {other}; use the lm-eval harness for those"
        )
    if examples is not None and examples < 1:
        raise BrickworkError(f"examples must be at least 1, got {examples}")
    out = []
    for task in _plan(specs, examples).bigbench:
        result = score_task(model, tokenizer, task)
        out.append(
            HarnessTaskResult(
                task=task.name,
                examples=result.examples,
                accuracy=result.accuracy,
                stderr=result.stderr,
                chance=result.chance,
                source="bigbench",
                harness="builtin",
                metrics={"acc": result.accuracy, "acc_stderr": result.stderr},
                predictions=result.predictions,
            )
        )
    return out


def render_table(results: list[HarnessTaskResult]) -> str:
    """Accuracy ± standard error per task (and length-normalised accuracy where reported)."""

    def cell(value, err) -> str:
        if value is None:
            return "-"
        return f"{value:.1%}" + (f" ± {err:.1%}" if err is not None else "")

    width = max([len("task")] + [len(r.task) for r in results])
    lines = [f"{'task':<{width}}  {'examples':>8}  {'accuracy':>15}  {'acc_norm':>15}  {'chance':>6}"]
    for r in results:
        if r.accuracy is None and r.metrics:  # not a multiple-choice task: its first reported figure
            metric = next(k for k in r.metrics if not k.endswith("_stderr") and "_stderr," not in k)
            lines.append(f"{r.task:<{width}}  {r.examples:>8}  {metric} {r.metrics[metric]:.4g}")
            continue
        chance = f"{r.chance:.1%}" if r.chance is not None else "-"
        lines.append(
            f"{r.task:<{width}}  {r.examples:>8}  {cell(r.accuracy, r.stderr):>15}  "
            f"{cell(r.accuracy_norm, r.stderr_norm):>15}  {chance:>6}"
        )
    return "\n".join(lines)
