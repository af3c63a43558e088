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


def _check_causal(model) -> None:
    if not getattr(model.config, "is_decoder", False) and model.config.model_type in ("bert",):
        raise BrickworkError(
            f"Perplexity needs a causal language model; '{model.config.model_type}' is an encoder."
        )
    if not hasattr(model, "generate") or getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise BrickworkError(f"{type(model).__name__} has no language-model head; load it as a causal LM.")


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
    nll_sum, parent_nll_sum, kl_sum, agree, predicted, windows = 0.0, 0.0, 0.0, 0, 0, 0
    batches = _batches(iter_token_windows(tokenizer, data, window, max_tokens), batch_size)
    total = None if max_tokens is None else max_tokens // window
    for batch in tqdm(
        batches,
        total=None if total is None else math.ceil(total / batch_size),
        unit="batch",
        desc=f"eval {Path(str(data)).name}",
        disable=not progress,
    ):
        ids = batch.to(device)
        targets = ids[:, 1:]
        logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        nll_sum += -logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        if parent is not None:
            parent_logprobs = torch.log_softmax(parent(input_ids=ids).logits[:, :-1].float(), dim=-1)
            parent_nll_sum += -parent_logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
            kl_sum += (parent_logprobs.exp() * (parent_logprobs - logprobs)).sum().item()
            agree += (parent_logprobs.argmax(-1) == logprobs.argmax(-1)).sum().item()
        predicted += targets.numel()
        windows += ids.shape[0]
    if windows == 0:
        raise BrickworkError(
            f"'{data}' yields no window of {window} tokens: give more text or a smaller window."
        )
    nll = nll_sum / predicted
    return EvalResult(
        data=describe_source(data),
        tokens=predicted,
        windows=windows,
        window=window,
        nll=nll,
        perplexity=math.exp(nll),
        kl=kl_sum / predicted if parent is not None else None,
        parent_perplexity=math.exp(parent_nll_sum / predicted) if parent is not None else None,
        agreement=agree / predicted if parent is not None else None,
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


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of ``model`` over the token windows ``[N, T]`` (on the model's
    device); ``math.exp`` of it is the perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for part in windows.split(batch_size):
        part = part.to(device)
        logits = model(input_ids=part).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1))
        total += float(nll) * part[:, 1:].numel()
        count += part[:, 1:].numel()
    return total / count
