"""Merge: bricks of several fine-tuned children of one carve in one model, a router choosing a child per token.

"Configurable Foundation Models" (Xiao et al. 2024) name merging among the brick operations: bricks trained apart
are put together. Branch-Train-MiX (Sukhbaatar et al. 2024) does it for whole FFNs: copies of one seed model are
trained on different domains, then each child's FFN becomes an expert beside the others' and a router picks among
them (the other weights are averaged). Here the children are copies of one carve (same :class:`BrickSpec` per
layer; ``brickwork update`` of one carved model on several domains), and each carved layer of the merged model is a
:class:`MergedBricks`: the children's BrickFFNs side by side and a linear domain router over the layer's FFN
input, fitted in closed form (ridge regression to one-hot domain labels, as :func:`brickwork.routing.fitted.ridge_fit`
fits) on FFN inputs each child sees on its own domain's text. Each token runs the one child brick its router
picks (top-1), so it reads as many weights as in one child. A layer whose bricks are the same in every child is
kept once, unrouted: merging one child gives that child back, bit for bit.

The reverse, :func:`average_children`, averages every weight of the children into one carve of the parent's shape
(a uniform model soup, Wortsman et al. 2022; EWA-style averaging of experts), which ``uncarve_`` turns back into a
dense model; what the averaging costs is the perplexity gap :func:`domain_perplexities` measures.

A merged model evaluates, generates, saves and loads like any carve; what reads or changes one carve's bricks
(``set_budget``, per-token budgets, recovery, export, ``uncarve_``) refuses it
(:func:`brickwork.bricks.state.carved_layers`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from brickwork.bricks.budget import calibrated
from brickwork.bricks.merged import MergedBricks, layer_modules
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carve_state, carved_layers, refuse_grown
from brickwork.errors import BrickworkError
from brickwork.routing.fitted import RIDGE

# config entries that say where a model came from, not what it computes
_PROVENANCE_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "_commit_hash",
    "architectures",
    "torch_dtype",  # the weights' dtypes are compared instead
    "dtype",
}


def clone_brick(brick: BrickFFN) -> BrickFFN:
    """A copy of ``brick`` alone (weights, router, carved settings), not tied to any model's layer."""
    copied = BrickFFN.from_spec(brick.spec, copy.deepcopy(brick.act), copy.deepcopy(brick.router))
    copied.load_state_dict(brick.state_dict())
    return copied.to(brick.up.device)


@dataclass
class ChildrenCheck:
    """How the children differ: the carved layers whose bricks differ, and the other parameters that differ."""

    layers: list[int]
    differing_layers: list[int]
    differing_parameters: list[str]


def check_children(children: list[nn.Module]) -> ChildrenCheck:
    """Refuse (BrickworkError) children that are not copies of one carve: same model class and config, same carved
    layers with the same spec, carved settings and neuron order, same weight names and shapes. Say what differs."""
    if not children:
        raise BrickworkError("merge needs at least one child model")
    first = children[0]
    hint = (
        "merge takes children of one carve (e.g. `brickwork update` of one carved model on several domains)"
    )
    for i, child in enumerate(children):
        if not isinstance(child, nn.Module) or not hasattr(child, "brickwork"):
            raise BrickworkError(f"child {i} is not a carved brickwork model; {hint}")
        if type(child) is not type(first):
            raise BrickworkError(
                f"child {i} is a {type(child).__name__}, child 0 a {type(first).__name__}; {hint}"
            )
        ours = {k: v for k, v in child.config.to_dict().items() if k not in _PROVENANCE_KEYS}
        theirs = {k: v for k, v in first.config.to_dict().items() if k not in _PROVENANCE_KEYS}
        if ours != theirs:
            keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise BrickworkError(f"child {i}'s config differs from child 0's in {keys[:5]}; {hint}")
    bricks = [carved_layers(child) for child in children]  # refuses a child that is itself merged
    for layers in bricks:
        refuse_grown(layers, "merge")
    for i, layers in enumerate(bricks):
        if sorted(layers) != sorted(bricks[0]):
            raise BrickworkError(
                f"child {i} carves layers {sorted(layers)}, child 0 layers {sorted(bricks[0])}; {hint}"
            )
        for index, brick in layers.items():
            base = bricks[0][index]
            if brick.spec != base.spec:
                raise BrickworkError(
                    f"child {i}'s layer {index} is {brick.spec.describe()}, child 0's {base.spec.describe()}; {hint}"
                )
            if calibrated(brick) != calibrated(base):
                raise BrickworkError(f"child {i}'s layer {index} was carved with other settings; {hint}")
    states = [child.state_dict() for child in children]
    first_buffers = dict(first.named_buffers())
    for i, state in enumerate(states):
        if state.keys() != states[0].keys():
            raise BrickworkError(f"child {i}'s weights are not named as child 0's; {hint}")
        for name, tensor in state.items():
            base = states[0][name]
            if tensor.shape != base.shape or tensor.dtype != base.dtype:
                raise BrickworkError(
                    f"child {i}'s {name} is {tuple(tensor.shape)} {tensor.dtype}, child 0's {tuple(base.shape)} "
                    f"{base.dtype}; load every child the same way"
                )
        for name, buffer in children[i].named_buffers():
            if not torch.equal(buffer.cpu(), first_buffers[name].cpu()):
                raise BrickworkError(
                    f"child {i}'s buffer {name} (e.g. a brick's neuron order) differs from child 0's; {hint}"
                )

    def same(name: str) -> bool:
        return all(torch.equal(s[name].cpu(), states[0][name].cpu()) for s in states[1:])

    names = {id(p): n for n, p in first.named_parameters()}
    brick_params: dict[int, list[str]] = {
        index: [names[id(p)] for p in brick.parameters()] for index, brick in bricks[0].items()
    }
    in_bricks = {n for ns in brick_params.values() for n in ns}
    return ChildrenCheck(
        layers=sorted(bricks[0]),
        differing_layers=sorted(i for i, ns in brick_params.items() if not all(same(n) for n in ns)),
        differing_parameters=[n for n in names.values() if n not in in_bricks and not same(n)],
    )


@torch.no_grad()
def _average_parameters(target: nn.Module, children: list[nn.Module], names: list[str]) -> None:
    """Set ``target``'s parameters ``names`` to the children's mean (summed in float64 in child order, so that
    identical children average to themselves exactly)."""
    params = dict(target.named_parameters())
    child_params = [dict(c.named_parameters()) for c in children]
    for name in names:
        total = sum(p[name].detach().to(params[name].device, torch.float64) for p in child_params)
        params[name].copy_((total / len(children)).to(params[name].dtype))


@torch.no_grad()
def average_children(children: list[nn.Module]) -> nn.Module:
    """A carve of the children's shape whose every weight (bricks and routers included) is the children's mean: a
    uniform model soup (Wortsman et al. 2022). The children are not changed; ``brickwork.uncarve_`` gives the
    averaged dense model."""
    check_children(children)
    model = copy.deepcopy(children[0])
    names = [n for n, _ in model.named_parameters()]
    _average_parameters(model, children, names)
    return model.eval()


@dataclass
class MergeReport:
    """What :func:`merge_children` did. ``accuracy[layer][i]``: the share of domain i's held-out tokens the layer
    routed to child i (in the merged model); ``domain_accuracy[i]``: the same over every merged layer."""

    children: int
    domains: list[str]
    merged_layers: list[int]
    shared_layers: list[int]  # bricks identical in every child: kept once, unrouted
    averaged: list[str]  # non-brick parameters that differed between children, averaged
    fit_tokens: list[int] = field(default_factory=list)
    heldout_tokens: list[int] = field(default_factory=list)
    accuracy: dict[int, list[float]] = field(default_factory=dict)
    domain_accuracy: list[float] = field(default_factory=list)

    @property
    def overall_accuracy(self) -> float | None:
        """Every domain's held-out tokens at every merged layer, routed to their own child (mean of domains)."""
        if not self.domain_accuracy:
            return None
        return sum(self.domain_accuracy) / len(self.domain_accuracy)

    def to_dict(self) -> dict:
        return {
            "children": self.children,
            "domains": self.domains,
            "merged_layers": self.merged_layers,
            "shared_layers": self.shared_layers,
            "averaged": self.averaged,
            "fit_tokens": self.fit_tokens,
            "heldout_tokens": self.heldout_tokens,
            "accuracy": {str(k): v for k, v in sorted(self.accuracy.items())},
            "domain_accuracy": self.domain_accuracy,
            "overall_accuracy": self.overall_accuracy,
        }

    def summary(self) -> str:
        lines = [
            f"merged {self.children} children: {len(self.merged_layers)} layers routed, "
            f"{len(self.shared_layers)} with the same bricks in every child kept once"
        ]
        if self.averaged:
            lines.append(f"averaged {len(self.averaged)} non-brick parameters that differ between children")
        if self.accuracy:
            lines.append("router accuracy (held-out tokens of domain i routed to child i):")
            for layer, shares in sorted(self.accuracy.items()):
                lines.append(f"  layer {layer}: " + "  ".join(f"{s:.1%}" for s in shares))
            for i, (domain, share) in enumerate(zip(self.domains, self.domain_accuracy, strict=True)):
                lines.append(f"  domain {i} ({domain}): {share:.1%}")
            lines.append(f"  overall: {self.overall_accuracy:.1%}")
        return "\n".join(lines)


def _split_windows(
    tokenizer, data, window: int, tokens: int, heldout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` of ``data`` as windows, split into the router's fitting windows and the last ``heldout`` share."""
    from brickwork.data.sources import token_windows

    windows = token_windows(tokenizer, data, window, tokens, min_windows=2)
    kept = min(len(windows) - 1, max(1, round(len(windows) * heldout)))
    return windows[: len(windows) - kept], windows[len(windows) - kept :]


def _run(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool, desc: str) -> None:
    device = next(model.parameters()).device
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        model(input_ids=batch.to(device))


class _Moments:
    """Streaming first and second moments of a layer's FFN inputs on one domain (float64)."""

    def __init__(self, d_model: int):
        self.count = 0
        self.sum = torch.zeros(d_model, dtype=torch.float64)
        self.gram = torch.zeros(d_model, d_model, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.count += len(x)
        self.sum += x.sum(0)
        self.gram += x.t() @ x


def fit_domain_router(moments: list[_Moments], ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [C, D], bias [C])`` of the ridge regression of one-hot domain labels on the FFN inputs, each
    domain weighted equally whatever its token count (its tokens weigh ``1 / count``); the same solve as
    :func:`brickwork.routing.fitted.ridge_fit`, from the domains' moments instead of the samples."""
    classes = len(moments)
    weights = [1.0 / m.count for m in moments]
    mean = sum(w * m.sum for w, m in zip(weights, moments, strict=True)) / classes
    gram = sum(w * m.gram for w, m in zip(weights, moments, strict=True)) - classes * torch.outer(mean, mean)
    cross = torch.stack([w * m.sum - mean for w, m in zip(weights, moments, strict=True)], dim=1)  # [D, C]
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-12))
    weight = torch.linalg.solve(gram, cross).t()
    return weight, torch.full((classes,), 1.0 / classes, dtype=torch.float64) - weight @ mean


# merge_children's options as ``brickwork merge`` shows them (the defaults are the signature's).
HELDOUT = 0.2  # share of each domain's windows the router's accuracy is measured on
MERGE_HELP = {
    "tokens": f"tokens of each domain text: the router fits on {1 - HELDOUT:.0%}, its accuracy is measured on the "
    "rest",
    "window": "tokens per window",
}


@torch.no_grad()
def merge_children(
    children: list[nn.Module],
    domain_texts: list,
    tokenizer,
    tokens: int = 16384,
    window: int = 256,
    heldout: float = HELDOUT,
    batch_size: int = 4,
    ridge: float = RIDGE,
    progress: bool = True,
) -> tuple[nn.Module, MergeReport]:
    """One model holding the bricks of every child (Branch-Train-MiX), and the report.

    ``children``: carves of one parent with the same carve (:func:`check_children`); ``domain_texts[i]``: child
    i's domain (any source :mod:`brickwork.data` reads). Each carved layer whose bricks differ between children
    becomes a :class:`MergedBricks` whose router is fitted on the FFN inputs child i sees on the first ``1 -
    heldout`` of ``tokens`` of its text; its accuracy is measured in the merged model on the rest. Layers with the
    same bricks in every child keep them once; non-brick weights that differ are averaged (as BTX does). The
    children are not changed."""
    from brickwork.data.sources import check_source, describe_source

    if len(domain_texts) != len(children):
        raise BrickworkError(
            f"give one domain text per child: {len(children)} children, {len(domain_texts)} texts"
        )
    if not 0 < heldout < 1:
        raise ValueError(f"heldout must be a fraction in (0, 1), got {heldout}")
    checked = check_children(children)
    for text in domain_texts:
        check_source(text)
    model = copy.deepcopy(children[0]).eval()
    _average_parameters(model, children, checked.differing_parameters)
    report = MergeReport(
        children=len(children),
        domains=[describe_source(t) for t in domain_texts],
        merged_layers=checked.differing_layers,
        shared_layers=[i for i in checked.layers if i not in checked.differing_layers],
        averaged=checked.differing_parameters,
    )
    model.brickwork.merged = {
        "children": len(children),
        "layers": report.merged_layers,
        "domains": report.domains,
    }
    if not report.merged_layers:  # nothing to route: every carved layer is the same in every child
        return model, report

    splits = [_split_windows(tokenizer, text, window, tokens, heldout) for text in domain_texts]
    report.fit_tokens = [fit.numel() for fit, _ in splits]
    report.heldout_tokens = [rest.numel() for _, rest in splits]
    child_bricks = [carved_layers(child) for child in children]
    moments: dict[int, list[_Moments]] = {}
    for i, (child, (fit, _)) in enumerate(zip(children, splits, strict=True)):
        seen = {index: _Moments(child_bricks[i][index].d_model) for index in report.merged_layers}
        handles = [
            child_bricks[i][index].register_forward_pre_hook(lambda _, args, m=m: m.add(args[0]))
            for index, m in seen.items()
        ]
        try:
            _run(child, fit, batch_size, progress, f"router inputs, domain {i}")
        finally:
            for handle in handles:
                handle.remove()
        for index, m in seen.items():
            moments.setdefault(index, []).append(m)

    own = carved_layers(model)
    for index in report.merged_layers:
        merged = MergedBricks([clone_brick(bricks[index]) for bricks in child_bricks])
        weight, bias = fit_domain_router(moments[index], ridge)
        merged.domain_weight.copy_(weight)
        merged.domain_bias.copy_(bias)
        carve_state(model).layers[index].put(merged.to(own[index].up.device))

    report.accuracy, report.domain_accuracy = router_accuracy(
        model, [rest for _, rest in splits], batch_size, progress
    )
    return model, report


@torch.no_grad()
def router_accuracy(
    model: nn.Module, domain_windows: list[torch.Tensor], batch_size: int = 4, progress: bool = True
) -> tuple[dict[int, list[float]], list[float]]:
    """Run each domain's windows through the merged ``model``; per merged layer, the share of domain i's tokens
    routed to child i, and per domain the same over every merged layer."""
    merged = {i: m for i, m in layer_modules(model).items() if isinstance(m, MergedBricks)}
    if not merged:
        raise BrickworkError("the model has no merged layer to measure")
    hits = {index: [0] * len(domain_windows) for index in merged}
    totals = [0] * len(domain_windows)

    def counter(index: int, domain: int):
        def count(module, args):
            hits[index][domain] += int((module.route(args[0].reshape(-1, module.d_model)) == domain).sum())

        return count

    for domain, windows in enumerate(domain_windows):
        handles = [m.register_forward_pre_hook(counter(i, domain)) for i, m in merged.items()]
        try:
            _run(model, windows, batch_size, progress, f"router accuracy, domain {domain}")
        finally:
            for handle in handles:
                handle.remove()
        totals[domain] = windows.numel()
    accuracy = {index: [h / t for h, t in zip(hits[index], totals, strict=True)] for index in merged}
    per_domain = [
        sum(hits[index][d] for index in merged) / (totals[d] * len(merged))
        for d in range(len(domain_windows))
    ]
    return accuracy, per_domain


def domain_perplexities(
    models: dict[str, nn.Module],
    tokenizer,
    domain_texts: list,
    window: int = 256,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Perplexity of each model (e.g. the merged model, the average and each child) on each domain's text: what
    merging keeps of each child's domain, and what averaging loses."""
    from brickwork.evaluation import evaluate

    return {
        name: [
            evaluate(
                model, tokenizer, text, window=window, max_tokens=max_tokens, progress=progress
            ).perplexity
            for text in domain_texts
        ]
        for name, model in models.items()
    }
