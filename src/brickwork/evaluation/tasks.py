"""Downstream multiple-choice accuracy, scored by the log-likelihood of each choice.

Tasks are BIG-bench JSON tasks (Srivastava et al. 2022, "Beyond the Imitation Game"): each example has an
``input`` and ``target_scores`` (choice -> score, 1 for the correct choice). The prompt is built the way
BIG-bench's JSON task builds it (``task_prefix``, ``example_input_prefix``, the input, the choices appended
after ``choice_prefix`` unless ``append_choices_to_input`` is false, ``example_output_prefix``), zero-shot.
Each choice is scored by the sum of its tokens' log-probabilities given the prompt; the prediction is the
highest-scoring choice and the example scores that choice's target score (BIG-bench's
``multiple_choice_grade``). Chance is the expected score of a uniformly random choice.

The task files come from the ``bigbench`` source distribution on PyPI, fetched and extracted on first use
(:func:`prepare_tasks`, or ``brickwork setup --tasks``); any BIG-bench-style JSON file can be passed by path.

Examples are shuffled once with a fixed seed and cut into two disjoint parts: ``eval`` (the first
``examples``) and ``select`` (the last ``examples``). The built-in default task list was chosen on the
``select`` part only (the dense model clearly above chance there), so the accuracies reported on the
``eval`` part are not inflated by that choice.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import random
import re
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from brickwork.data import registry
from brickwork.errors import BrickworkError
from brickwork.io_utils import atomic_write_text
from brickwork.settings import cache_dir

logger = logging.getLogger(__name__)

BIGBENCH_ARCHIVE = registry.RegistryFile(
    project="bigbench",
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    size_hint="358 MB",
    manual_env="BRICKWORK_BIGBENCH_ARCHIVE",
)
BIGBENCH_LICENCE = "Apache-2.0 (BIG-bench); see each task's README in the archive for its data sources"
# Multiple-choice BIG-bench tasks in English with short prompts and few choices, so that a whole benchmark
# row costs seconds; all are extracted together on first use. The default list is the subset on which the dense
# SmolLM2-135M is clearly above chance on the `select` split (bench/results/task-selection/).
CANDIDATE_TASKS: tuple[str, ...] = (
    "anachronisms",
    "analytic_entailment",
    "common_morpheme",
    "crass_ai",
    "dark_humor_detection",
    "date_understanding",
    "disambiguation_qa",
    "emoji_movie",
    "emojis_emotion_prediction",
    "empirical_judgments",
    "entailed_polarity",
    "epistemic_reasoning",
    "fantasy_reasoning",
    "general_knowledge",
    "hindu_knowledge",
    "hyperbaton",
    "implicatures",
    "intent_recognition",
    "irony_identification",
    "known_unknowns",
    "logical_fallacy_detection",
    "metaphor_boolean",
    "misconceptions",
    "moral_permissibility",
    "movie_recommendation",
    "navigate",
    "odd_one_out",
    "phrase_relatedness",
    "physical_intuition",
    "physics",
    "presuppositions_as_nli",
    "riddle_sense",
    "ruin_names",
    "sentence_ambiguity",
    "similarities_abstraction",
    "snarks",
    "social_iqa",
    "social_support",
    "sports_understanding",
    "strategyqa",
    "swahili_english_proverbs",
    "understanding_fables",
    "winowhy",
)
# Kept by bench/task_selection.py (bench/results/task-selection/): dense accuracy at least 3 standard errors
# above both chance and the best constant answer on the `select` split.
DEFAULT_TASKS: tuple[str, ...] = (
    "date_understanding",
    "emoji_movie",
    "physics",
    "similarities_abstraction",
)
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass
class MultipleChoiceTask:
    name: str
    examples: list[Example]

    @property
    def chance(self) -> float:
        return sum(sum(e.scores) / len(e.scores) for e in self.examples) / len(self.examples)

    @property
    def majority(self) -> float:
        """Score of always answering the same label (the best such label), for tasks whose choices are a
        fixed label set such as yes/no; near 0 for tasks whose choices differ per example."""
        totals: dict[str, float] = {}
        for e in self.examples:
            for choice, score in zip(e.choices, e.scores, strict=True):
                totals[choice] = totals.get(choice, 0.0) + score
        return max(totals.values()) / len(self.examples)

    def split(self, part: Literal["eval", "select"], examples: int | None = None) -> MultipleChoiceTask:
        """A fixed, seeded subset: ``eval`` is the first ``examples`` of a shuffle, ``select`` the last.

        The two never overlap: with fewer than ``2 * examples`` examples, each gets half.
        """
        order = list(range(len(self.examples)))
        random.Random(SPLIT_SEED).shuffle(order)
        n = len(order) // 2 if examples is None else min(examples, len(order) // 2)
        if n == 0:
            raise BrickworkError(f"task '{self.name}' has {len(order)} example(s); it needs at least 2")
        chosen = order[:n] if part == "eval" else order[len(order) - n :]
        return MultipleChoiceTask(self.name, [self.examples[i] for i in chosen])


@dataclass
class TaskResult:
    task: str
    accuracy: float
    chance: float
    majority: float
    examples: int
    seconds: float
    predictions: list[int] = field(default_factory=list)  # the chosen choice of each example

    @property
    def stderr(self) -> float:
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 0.0) / self.examples)

    def to_dict(self) -> dict:
        """The figures, without the per-example predictions."""
        out = asdict(self)
        del out["predictions"]
        return dict(out, stderr=self.stderr)


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("false", "0", "no")


def task_from_bigbench(data: dict, name: str) -> MultipleChoiceTask:
    """Multiple-choice examples of a BIG-bench JSON task, prompts built as BIG-bench's JSON task does."""
    task_prefix = data.get("task_prefix", "")
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append_choices = _flag(data.get("append_choices_to_input", True))
    examples = []
    for raw in data.get("examples", []):
        if "target_scores" not in raw or len(raw["target_scores"]) < 2:
            continue
        choices = tuple(raw["target_scores"])
        prompt = input_prefix + raw["input"]
        if append_choices:
            prompt += choice_prefix + choice_prefix.join(choices)
        examples.append(
            Example(
                prompt=task_prefix + prompt + output_prefix,
                choices=choices,
                scores=tuple(float(s) for s in raw["target_scores"].values()),
            )
        )
    if not examples:
        raise BrickworkError(
            f"task '{name}' has no multiple-choice examples (entries with at least two 'target_scores')"
        )
    return MultipleChoiceTask(name, examples)


def tasks_dir() -> Path:
    return cache_dir() / "tasks"


def load_task(name_or_path: str | Path) -> MultipleChoiceTask:
    """A built-in task by name (prepared by ``brickwork setup``) or a BIG-bench-style JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        name = path.parent.name if path.stem == "task" else path.stem
    elif str(name_or_path) in CANDIDATE_TASKS:
        name, path = str(name_or_path), tasks_dir() / f"{name_or_path}.json"
        if not path.is_file():
            prepare_tasks([name])  # first use: fetch the archive once and extract every built-in task
    else:
        raise BrickworkError(
            f"Unknown task '{name_or_path}'. Built-in tasks: {', '.join(CANDIDATE_TASKS)}; or pass the path "
            "of a BIG-bench-style task.json (examples with 'input' and 'target_scores')."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BrickworkError(f"Could not read task file {path}: {exc}") from exc
    return task_from_bigbench(data, name)


# --- scoring -------------------------------------------------------------------------------------------
def _encode(tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, choice ids) per choice; a space that ends the prompt is moved to the choice, so that
    tokenizers that fold a leading space into the next word see the word as it occurs in text."""
    prompt, lead = example.prompt, ""
    if prompt.endswith(" "):
        prompt, lead = prompt.rstrip(" "), " "
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for choice in example.choices:
        ids = tokenizer(lead + choice, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BrickworkError(f"a choice of an example tokenises to nothing: {choice!r}")
        out.append((context, ids))
    return out


@torch.no_grad()
def choice_logprobs(
    model, tokenizer, task: MultipleChoiceTask, batch_tokens: int = 8192, max_length: int = 1024
) -> list[list[float]]:
    """Sum of log p(choice tokens | prompt) for every choice of every example.

    The prompt runs once per example: prompts are left-padded (explicit position ids) and their key/value
    cache is reused, copied, for each choice, so a choice costs its own tokens only.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []  # (example index, prompt ids, [choice ids])
    for e, example in enumerate(task.examples):
        pairs = _encode(tokenizer, example)
        longest = max(len(ids) for _, ids in pairs)
        encoded.append((e, pairs[0][0][-(max_length - longest) :], [ids for _, ids in pairs]))
    encoded.sort(key=lambda item: len(item[1]))
    scores = [[0.0] * len(ex.choices) for ex in task.examples]
    start = 0
    while start < len(encoded):
        end = start + 1
        while end < len(encoded) and len(encoded[end][1]) * (end + 1 - start) <= batch_tokens:
            end += 1
        batch, start = encoded[start:end], end
        length = len(batch[-1][1])
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (_, prompt, _) in enumerate(batch):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each choice's first token
        for j in range(max(len(choices) for _, _, choices in batch)):
            rows = [(row, choices[j]) for row, (_, _, choices) in enumerate(batch) if j < len(choices)]
            width = max(len(c) for _, c in rows) - 1  # choice tokens after the first
            rest = None
            if width > 0:
                cids = torch.full((len(batch), width), pad, dtype=torch.long)
                cmask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, choice in rows:
                    cids[row, : len(choice) - 1] = torch.tensor(choice[:-1])
                    cmask[row, : len(choice) - 1] = 1
                rest = torch.log_softmax(
                    model(
                        input_ids=cids.to(device),
                        attention_mask=torch.cat([mask, cmask], dim=1).to(device),
                        position_ids=(positions[:, -1:] + 1 + torch.arange(width)).to(device),
                        past_key_values=copy.deepcopy(out.past_key_values),
                        use_cache=True,
                    ).logits.float(),
                    dim=-1,
                )
            for row, choice in rows:
                total = first[row, choice[0]].item()
                if len(choice) > 1:
                    targets = torch.tensor(choice[1:], device=device)
                    total += rest[row, : len(choice) - 1].gather(-1, targets[:, None]).sum().item()
                scores[batch[row][0]][j] = total
    return scores


def score_task(model, tokenizer, task: MultipleChoiceTask, batch_tokens: int = 8192) -> TaskResult:
    """Multiple-choice accuracy (BIG-bench ``multiple_choice_grade``) of ``model`` on ``task``."""
    started = time.perf_counter()
    logprobs = choice_logprobs(model, tokenizer, task, batch_tokens)
    predictions = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
    total = sum(e.scores[p] for e, p in zip(task.examples, predictions, strict=True))
    return TaskResult(
        task=task.name,
        accuracy=total / len(task.examples),
        chance=task.chance,
        majority=task.majority,
        examples=len(task.examples),
        seconds=time.perf_counter() - started,
        predictions=predictions,
    )


# --- preparing the built-in tasks ----------------------------------------------------------------------
def _bigbench_archive(archive: Path | None, into: Path, progress: bool) -> Path:
    """The pinned bigbench sdist: ``archive`` or ``$BRICKWORK_BIGBENCH_ARCHIVE`` when given (verified), else
    fetched from the package index's simple pages (its metadata build fails, so ``pip download`` cannot)."""
    given = archive or os.environ.get(BIGBENCH_ARCHIVE.manual_env)
    if given:
        return registry.verify(BIGBENCH_ARCHIVE, Path(given).expanduser())
    logger.info(
        "downloading %s (%s) for the built-in tasks", BIGBENCH_ARCHIVE.filename, BIGBENCH_ARCHIVE.size_hint
    )
    return registry.download(BIGBENCH_ARCHIVE, into, progress=progress)


def prepare_tasks(
    names: list[str] | None = None, force: bool = False, archive: Path | None = None, progress: bool = True
) -> dict:
    """Extract the built-in tasks' task.json files from the bigbench sdist into ``$BRICKWORK_HOME/tasks``.

    When the archive has to be read, every candidate task missing from the cache is extracted from it, so
    the 358 MB archive is fetched at most once.
    """
    names = list(CANDIDATE_TASKS) if names is None else names
    unknown = [n for n in names if n not in CANDIDATE_TASKS]
    if unknown:
        raise BrickworkError(f"Unknown task(s) {unknown}; built-in tasks: {', '.join(CANDIDATE_TASKS)}")
    out = tasks_dir()
    paths = {name: out / f"{name}.json" for name in names}
    if not force and all(path.is_file() for path in paths.values()):
        return paths
    wanted = set(names) if force else set()
    wanted |= {name for name in CANDIDATE_TASKS if not (out / f"{name}.json").is_file()}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="brickwork-tasks-") as tmp:
        archive = _bigbench_archive(archive, Path(tmp), progress)
        pattern = re.compile(r"[^/]+/bigbench/benchmark_tasks/([^/]+)/task\.json")
        found: dict[str, bytes] = {}
        with tarfile.open(archive) as tf:
            for member in tf:
                match = pattern.fullmatch(member.name)
                if match and match.group(1) in wanted:
                    handle = tf.extractfile(member)
                    if handle is not None:
                        found[match.group(1)] = handle.read()
        absent = sorted((wanted & set(names)) - set(found))  # asked for, neither cached nor in the archive
        if absent:
            raise BrickworkError(f"{archive} holds no task.json for {absent}")
        for name, data in sorted(found.items()):
            text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()
            atomic_write_text(out / f"{name}.json", text)
        record = dict(
            asdict(BIGBENCH_ARCHIVE),
            licence=BIGBENCH_LICENCE,
            tasks=sorted(_prepared_names(out)),
        )
        atomic_write_text(out / "SOURCE.json", json.dumps(record, indent=2))
    return paths


def _prepared_names(directory: Path) -> list[str]:
    return [p.stem for p in directory.glob("*.json") if p.stem in CANDIDATE_TASKS]
