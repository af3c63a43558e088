from __future__ import annotations

import pytest
import torch

from brickwork.bricks import paths as kernels
from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers
from conftest import carved_tiny

CONFIGS = {
    "experts+fitted": dict(experts=8, shared=1, active=2, router="fitted"),
    "experts+centroid, no shared": dict(experts=8, shared=0, active=3, router="centroid"),
    "experts+representative": dict(experts=16, shared=2, active=5, router="representative"),
    "experts+oracle": dict(experts=8, shared=2, active=2, router="oracle"),
    "experts+partial+down rows": dict(experts=16, shared=0, active=4, router="partial", down_fraction=0.2),
    "neurons+partial+down rows": dict(
        experts=64,
        shared=0,
        active=20,
        router="partial",
        router_options={"input_fraction": 0.125},
        down_fraction=0.1,
    ),
    "all active": dict(experts=8, shared=1, active=7, router="fitted"),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tokens", [1, 3, 8, 37])
def test_fast_paths_match_the_reference(name, tokens, text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, **CONFIGS[name])
    x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(tokens))
    for brick in carved_layers(model).values():
        assert kernels.supports_fast_path(brick)
        with torch.no_grad():
            reference = brick.forward_reference(x)
            fast = brick(x)
        assert (fast - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text", "gpt2"])
def test_every_architecture_is_either_fast_and_exact_or_left_on_the_reference_path(
    model_type, text_file, tokenizer
):
    model = carved_tiny(text_file, tokenizer, model_type, experts=8, shared=1, active=2, router="fitted")
    x = torch.randn(1, 1, 32)
    for brick in carved_layers(model).values():
        silu_gated = model_type in ("mistral", "qwen2", "qwen3", "phi3")  # gemma: GELU; gpt2: not gated
        assert kernels.supports_fast_path(brick) == silu_gated
        with torch.no_grad():
            assert (brick(x) - brick.forward_reference(x)).abs().max() <= 1e-5


def test_paths_are_chosen_by_token_count(text_file, tokenizer, monkeypatch):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2, router="fitted")
    brick = next(iter(carved_layers(model).values()))
    used = []
    monkeypatch.setattr(
        kernels,
        "tokens_forward",
        lambda b, x, p=None: used.extend(["token"] * len(x)) or b.forward_reference(x),
    )
    monkeypatch.setattr(
        kernels, "grouped_forward", lambda b, x: used.append("grouped") or b.forward_reference(x)
    )
    monkeypatch.setattr(
        kernels, "batch_forward", lambda b, x, p=None: used.append("batch") or b.forward_reference(x)
    )
    monkeypatch.setitem(kernels.SWITCH_POINTS, "token_max", 2)
    monkeypatch.setitem(kernels.SWITCH_POINTS, "grouped_min", 6)
    with torch.no_grad():
        for tokens in (1, 2, 4, 6):
            used.clear()
            brick(torch.randn(tokens, 32))
            assert used == {1: ["token"], 2: ["token"] * 2, 4: ["batch"], 6: ["grouped"]}[tokens]
    with torch.enable_grad():  # training takes the differentiable reference path
        used.clear()
        brick(torch.randn(1, 32, requires_grad=True)).sum().backward()
        assert used == [] and brick.up.grad is not None


def test_packed_weights_follow_in_place_changes(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, experts=8, shared=1, active=2, router="fitted")
    brick = next(iter(carved_layers(model).values()))
    x = torch.randn(1, 32)
    with torch.no_grad():
        before = brick(x)
        brick.down_t.mul_(2)
        assert torch.allclose(brick(x), 2 * before, atol=1e-6)
        brick.down_t.data = brick.down_t.data / 4  # a new tensor, not an in-place change
        assert torch.allclose(brick(x), before / 2, atol=1e-6)
        brick.router.weight.mul_(-1)  # routing changes: other experts
        assert torch.allclose(brick(x), brick.forward_reference(x), atol=1e-5)
        brick.accumulate = "float64"  # the plan follows the accumulation too
        assert torch.equal(brick(x), brick.forward_reference(x))


def test_greedy_generation_is_the_same_on_fast_and_reference_paths(text_file, tokenizer, monkeypatch):
    model = carved_tiny(text_file, tokenizer, experts=16, shared=2, active=3, router="fitted")
    prompt = torch.tensor([[5, 17, 33, 41, 9, 60, 12, 70, 3 + 4, 21]])

    def generate():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id=0
        )

    fast = generate()
    monkeypatch.setattr(BrickFFN, "use_kernels", False)
    reference = generate()
    assert torch.equal(fast, reference)


def test_switch_points_depend_on_router_family_and_reads(monkeypatch):
    from brickwork.routing.partial import PartialInputRouter

    own = PartialInputRouter.switch_points  # the router's own points, where the table has none for its family
    assert kernels.switch_point("token_max", "partial", 0.25, own) == 3
    assert kernels.switch_point("token_max", "partial", 0.5, own) == 4
    assert (
        kernels.switch_point("dense_down_min", "partial", 0.25, own) == 24
    )  # none of its own: the linear ones
    table = {"linear": ((0.3, 16), (1.0, 8)), "partial": ((0.3, 4), (1.0, 1))}
    monkeypatch.setitem(kernels.SWITCH_POINTS, "token_max", table)
    assert kernels.switch_point("token_max", "linear", 0.25) == 16
    assert kernels.switch_point("token_max", "linear", 0.5) == 8
    assert kernels.switch_point("token_max", "partial", 0.25, own) == 4  # the table's entry wins
    assert kernels.switch_point("token_max", "partial", 0.5) == 1
    assert kernels.switch_point("token_max", "other", 0.25) == 16  # unknown families use the linear table
    monkeypatch.setitem(kernels.SWITCH_POINTS, "grouped_min", 40)
    kernels.set_switch_points(token_max=3)
    assert kernels.switch_point("token_max", "partial", 0.9) == 3
    assert kernels.switch_point("grouped_min", "linear", 0.2) == 40


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dense_down", [False, True])
@pytest.mark.parametrize(
    "tokens", [13, 70]
)  # the partial router's batch estimate blocks neurons from 64 tokens
def test_batch_path_matches_the_reference_whatever_the_down_projection(
    name, dense_down, tokens, text_file, tokenizer, monkeypatch
):
    model = carved_tiny(text_file, tokenizer, **CONFIGS[name])
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(3))
    monkeypatch.setitem(kernels.SWITCH_POINTS, "dense_down_min", 1 if dense_down else 10**9)
    for brick in carved_layers(model).values():
        with torch.no_grad():
            assert (kernels.batch_forward(brick, x) - brick.forward_reference(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["experts+fitted", "neurons+partial+down rows"])
def test_batch_path_does_not_depend_on_the_thread_count(name, text_file, tokenizer):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    model = carved_tiny(text_file, tokenizer, **CONFIGS[name])
    x = torch.randn(29, 32, generator=torch.Generator().manual_seed(5))
    threads = numba.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            with torch.no_grad():
                outputs.append([kernels.batch_forward(b, x) for b in carved_layers(model).values()])
    finally:
        numba.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


@pytest.mark.parametrize("name", CONFIGS)
def test_float64_sums_give_the_reference_bits_on_every_path(name, text_file, tokenizer, monkeypatch):
    model = carved_tiny(text_file, tokenizer, accumulate="float64", **CONFIGS[name])
    bricks = list(carved_layers(model).values())
    assert all(b.accumulate == "float64" for b in bricks)
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(11))
    monkeypatch.setitem(kernels.SWITCH_POINTS, "dense_down_min", 1)  # exact bricks must not take it
    monkeypatch.setitem(kernels.SWITCH_POINTS, "grouped_min", 1)  # nor the grouped float32 matmuls
    for brick in bricks:
        with torch.no_grad():
            reference = brick.forward_reference(x)
            assert torch.equal(kernels.tokens_forward(brick, x), reference)
            assert torch.equal(kernels.batch_forward(brick, x), reference)
            assert torch.equal(brick(x), reference)
            # the float64 sums differ from float32 ones: the option is not a no-op
            brick.accumulate = "float32"
            assert not torch.equal(brick.forward_reference(x), reference)
            brick.accumulate = "float64"


def test_float64_sums_selection_is_the_reference_selection_near_ties(text_file, tokenizer):
    """Inputs a rounding step apart from a tie: the kernels' selection is the reference's."""
    model = carved_tiny(text_file, tokenizer, accumulate="float64", **CONFIGS["neurons+partial+down rows"])
    brick = next(iter(carved_layers(model).values()))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    x = torch.cat([x, x + x.abs() * 2.0**-23, x.nextafter(torch.zeros(()))])  # ulp-sized perturbations
    with torch.no_grad():
        assert torch.equal(kernels.batch_forward(brick, x), brick.forward_reference(x))
        assert torch.equal(kernels.tokens_forward(brick, x), brick.forward_reference(x))


@pytest.mark.parametrize("tokens", [5, 70])
def test_partial_router_batch_selects_what_float64_numpy_selects(tokens):
    """The batch estimate over several neuron blocks (300 neurons, blocks of 128 from 64 tokens, one per thread
    below) against the same estimate in numpy, float64 sums rounded once, ties by position."""
    import numba
    import numpy as np

    from brickwork.kernels import cpu

    rng = np.random.default_rng(tokens)
    d, f, keep, active = 48, 300, 12, 40
    gate_t = rng.standard_normal((d, f)).astype(np.float32)
    up_t = rng.standard_normal((d, f)).astype(np.float32)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    chosen = cpu.partial_router_batch(
        x.astype(np.float64), keep, gate_t, up_t, active, 0, 1, numba.get_num_threads()
    )
    for t in range(tokens):
        cols = np.sort(np.argsort(-np.abs(x[t]), kind="stable")[:keep])
        g = x[t, cols].astype(np.float64) @ gate_t[cols].astype(np.float64)
        u = x[t, cols].astype(np.float64) @ up_t[cols].astype(np.float64)
        scores = np.abs(g / (1.0 + np.exp(-g)) * u).astype(np.float32)
        expected = np.argsort(-scores, kind="stable")[:active]
        assert set(chosen[t]) == set(expected)


def test_float64_exp_is_within_an_ulp_of_numpy():
    import numpy as np

    from brickwork.kernels import cpu

    g = np.concatenate([np.linspace(-750, 750, 20001), np.random.default_rng(0).normal(0, 4, 20000)])
    u = np.ones_like(g)
    out = np.empty(g.shape, dtype=np.float32)
    cpu._silu_product64(g, u, out, True)
    with np.errstate(over="ignore"):
        expected = np.abs(g / (1.0 + np.exp(-g))).astype(np.float32)
    assert np.array_equal(out, expected)


def test_training_runs_in_float32_whatever_the_accumulation(text_file, tokenizer):
    model = carved_tiny(text_file, tokenizer, accumulate="float64", **CONFIGS["experts+fitted"])
    brick = next(iter(carved_layers(model).values()))
    x = torch.randn(5, 32, requires_grad=True)
    y = brick(x)
    assert y.dtype == torch.float32 and not brick.exact(x)
    y.sum().backward()
    assert brick.up.grad is not None


def test_topk_selects_what_a_sort_selects_ties_by_position():
    import numpy as np

    from brickwork.kernels.cpu import _topk_indices

    rng = np.random.default_rng(0)

    def by_sorting(values, k):
        if k >= len(values):
            return list(range(len(values)))
        threshold = np.sort(values)[len(values) - k]
        above = [i for i, v in enumerate(values) if v > threshold]
        ties = [i for i, v in enumerate(values) if v == threshold]
        return above + ties[: k - len(above)]

    for trial in range(400):
        n = int(rng.choice([3, 14, 64, 65, 576, 1024, 1025, 1536]))
        k = int(rng.integers(1, n + 2))
        values = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            values = np.abs(values)
        if trial % 4 == 0:  # many ties, -0.0 among them
            values = np.round(values * 2).astype(np.float32) * np.float32(-1.0 if trial % 8 else 1.0)
        if trial % 5 == 0:  # subnormals
            values = (values * 1e-40).astype(np.float32)
        assert _topk_indices(values, k).tolist() == by_sorting(values, k), (n, k, trial)


def test_routing_is_chosen_by_what_the_router_declares():
    """The kernels route by what the router's own file declares (``computes`` and ``fast_paths``), never by its
    name: a router under a new name gets its parent's fast paths; a router that declares a score form without
    bringing fast paths for it is refused when it is defined; one that declares ``scores`` is routed in torch."""
    from brickwork.bricks.spec import BrickSpec
    from brickwork.kernels import cpu
    from brickwork.routing import ROUTERS
    from brickwork.routing.centroid import CentroidRouter

    if not kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    declared = {kind: cls.computes for kind, cls in ROUTERS.items()}
    assert declared["fitted"] == declared["trained"] == declared["centroid"] == "linear"
    assert declared["partial"] == "partial"
    assert {declared[k] for k in ("oracle", "lowrank", "representative")} == {"scores"}
    assert all(
        set(cls.fast_paths) == {"token", "batch"} for cls in ROUTERS.values() if cls.computes != "scores"
    )

    class Renamed(CentroidRouter):  # a linear router under a name the kernels have never seen
        kind = "renamed"

    def brick(router):
        spec = BrickSpec(d_model=16, num_shared=4, num_experts=6, expert_size=4, active=2, router=router.kind)
        b = BrickFFN.from_spec(spec, torch.nn.SiLU(), router)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in b.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        return b

    linear = brick(Renamed(torch.zeros(6, 16), torch.zeros(6)))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    assert kernels.plan(linear).kernel is cpu.linear_router_token  # routed inside the compiled call
    with torch.no_grad():
        for path in (kernels.tokens_forward, kernels.batch_forward):
            assert (path(linear, x) - linear.forward_reference(x)).abs().max() <= 1e-5

    with pytest.raises(TypeError, match="declares computes = 'mystery' but brings no fast path"):

        class Mystery(Renamed):
            kind = "mystery"
            computes = "mystery"

    class InTorch(Renamed):
        kind = "in-torch"
        computes = "scores"
        fast_paths = {}

    unknown = brick(InTorch(torch.zeros(6, 16), torch.zeros(6)))
    assert kernels.plan(unknown).kernel is None  # routed in torch, as the reference path routes
    with torch.no_grad():
        assert (unknown(x) - unknown.forward_reference(x)).abs().max() <= 1e-5
