"""Perplexity, and divergence from a parent model, over held-out text.

Protocol: the text is cut into consecutive non-overlapping windows of ``window`` tokens
(:func:`brickwork.data.iter_token_windows`); each window is scored on its own, with no context carried
over, predicting tokens 2..window from their prefixes. Perplexity is ``exp`` of the mean negative
log-likelihood over all predicted tokens. With a parent model, ``kl`` is the mean over the same positions of
``KL(parent || model) = sum_v p_parent(v) (log p_parent(v) - log p_model(v))`` in nats, and ``agreement``
the fraction of positions where both models' most likely next token is the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from brickwork.data.sources import describe_source, iter_token_windows
from brickwork.errors import BrickworkError


@dataclass
class EvalResult:
    data: str
    tokens: int  # predicted tokens
    windows: int
    window: int
    nll: float
    perplexity: float
    kl: float | None = None
    parent_perplexity: float | None = None
    agreement: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeldOutScore:
    """Sums over the predicted positions of held-out windows (see the module's protocol); with a reference
    (the dense parent), its negative log-likelihood, the KL from it and the top-1 agreement with it."""

    tokens: int
    nll_sum: float
    reference_nll_sum: float | None = None
    kl_sum: float | None = None
    agree: int | None = None

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def reference_perplexity(self) -> float | None:
        return None if self.reference_nll_sum is None else math.exp(self.reference_nll_sum / self.tokens)

    @property
    def ratio(self) -> float | None:
        """Perplexity over the reference's."""
        if self.reference_nll_sum is None:
            return None
        return math.exp((self.nll_sum - self.reference_nll_sum) / self.tokens)

    @property
    def kl(self) -> float | None:
        return None if self.kl_sum is None else self.kl_sum / self.tokens

    @property
    def agreement(self) -> float | None:
        return None if self.agree is None else self.agree / self.tokens


@torch.no_grad()
def window_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, window - 1, vocab]`` float32 next-token log-probabilities of ``model`` on the windows ``ids``."""
    return torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def score_logprobs(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> HeldOutScore:
    """The held-out scorer every perplexity in brickwork comes from: per batch ``(ids, logprobs, reference)``,
    the windows' token ids ``[b, T]``, the model's log-probabilities ``[b, T - 1, vocab]`` of their next tokens
    and the reference's (or None for none), summed over every predicted position."""
    nll, reference_nll, kl, agree, count, referenced = 0.0, 0.0, 0.0, 0, 0, None
    for ids, logprobs, reference in batches:
        targets = ids[:, 1:].unsqueeze(-1)
        nll -= logprobs.gather(-1, targets).sum().item()
        if referenced is None:
            referenced = reference is not None
        if (reference is not None) != referenced:
            raise ValueError("score_logprobs: give a reference for every batch or for none")
        if reference is not None:
            reference_nll -= reference.gather(-1, targets).sum().item()
            kl += (reference.exp() * (reference - logprobs)).sum().item()
            agree += (reference.argmax(-1) == logprobs.argmax(-1)).sum().item()
        count += targets.numel()
    if count == 0:
        raise BrickworkError("no held-out position to score: give at least one window of two or more tokens")
    if not referenced:
        return HeldOutScore(count, nll)
    return HeldOutScore(count, nll, reference_nll, kl, agree)


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, reference=None, batch_size: int = 4) -> HeldOutScore:
    """:func:`score_logprobs` of ``model`` on the token windows ``[N, T]``, ``batch_size`` windows at a time (on
    the model's device); ``reference``: a parent model, or its log-probabilities cached per batch (a list, as
    ``[window_logprobs(parent, b) for b in windows.split(batch_size)]`` gives them)."""
    device = next(model.parameters()).device
    parts = windows.split(batch_size)
    if isinstance(reference, list) and len(reference) != len(parts):
        raise ValueError(
            f"reference holds {len(reference)} cached batches, the windows make {len(parts)} of {batch_size}"
        )

    def batches():
        for i, part in enumerate(parts):
            part = part.to(device)
            if reference is None or isinstance(reference, list):
                ref = None if reference is None else reference[i]
            else:
                ref = window_logprobs(reference, part)
            yield part, window_logprobs(model, part), ref

    return score_logprobs(batches())


def _check_causal(model) -> None:
    if not getattr(model.config, "is_decoder", False) and model.config.model_type in ("bert",):
        raise BrickworkError(
            f"Perplexity needs a causal language model; '{model.config.model_type}' is an encoder."
        )
    if not hasattr(model, "generate") or getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise BrickworkError(f"{type(model).__name__} has no language-model head; load it as a causal LM.")


# evaluate's options as ``brickwork eval`` shows them (the defaults are the signature's).
EVALUATE_HELP = {
    "window": "tokens per window",
    "max_tokens": {"help": "stop after this many tokens per corpus", "default_text": "all"},
    "batch_size": "windows per forward pass",
}


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    data: str | Path,
    parent=None,
    window: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> EvalResult:
    """Score ``model`` on ``data`` (any source :func:`brickwork.data.iter_token_windows` accepts)."""
    _check_causal(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BrickworkError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_tokens is not None and max_tokens < window:
        raise BrickworkError(
            f"max_tokens={max_tokens} is smaller than one window of {window} tokens; raise it or "
            "use a smaller window."
        )
    if parent is not None:
        _check_causal(parent)
        if parent.config.vocab_size != model.config.vocab_size:
            raise BrickworkError(
                "The parent and the model have different vocabularies; they cannot be compared."
            )
    device = next(model.parameters()).device
    started = time.perf_counter()
    windows = 0
    total = None if max_tokens is None else max_tokens // window
    progress_bar = tqdm(
        _batches(iter_token_windows(tokenizer, data, window, max_tokens), batch_size),
        total=None if total is None else math.ceil(total / batch_size),
        unit="batch",
        desc=f"eval {Path(str(data)).name}",
        disable=not progress,
    )

    def batches():
        nonlocal windows
        for batch in progress_bar:
            ids = batch.to(device)
            windows += ids.shape[0]
            yield ids, window_logprobs(model, ids), None if parent is None else window_logprobs(parent, ids)

    try:
        score = score_logprobs(batches())
    except BrickworkError:
        if windows:
            raise
        raise BrickworkError(
            f"'{data}' yields no window of {window} tokens: give more text or a smaller window."
        ) from None
    return EvalResult(
        data=describe_source(data),
        tokens=score.tokens,
        windows=windows,
        window=window,
        nll=score.nll,
        perplexity=score.perplexity,
        kl=score.kl,
        parent_perplexity=score.reference_perplexity,
        agreement=score.agreement,
        seconds=time.perf_counter() - started,
    )


def _batches(windows, batch_size: int):
    batch = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def mean_nll(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of ``model`` over the token windows ``[N, T]`` (on the model's
    device); ``math.exp`` of it is the perplexity."""
    return score_windows(model, windows, batch_size=batch_size).nll
