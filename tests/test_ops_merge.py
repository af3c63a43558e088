from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import brickwork as bw
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.ops.merge import (
    MergedBricks,
    average_children,
    domain_perplexities,
    layer_modules,
    merge_children,
)
from brickwork.ops.train import TrainConfig, train_lm_
from conftest import carved_tiny, synthetic_text

CARVE = dict(experts=8, shared=1, active=2)
MERGE = dict(tokens=1024, window=32, progress=False)


def _domain_text(alphabet: str, seed: int, words: int = 1200) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(words // 12):
        lines.append(" ".join("".join(rng.choices(alphabet, k=rng.randint(2, 7))) for _ in range(12)))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer):
    """Two domain texts with different characters (lowercase words; digits with punctuation), a tiny carve, and
    two children of it whose bricks (only) trained a few steps on their own domain. Built once: tests copy."""
    root = tmp_path_factory.mktemp("merge")
    domains = []
    for name, alphabet, seed in (
        ("letters", "abcdefghijklmnopqrstuvwxyz", 1),
        ("digits", "0123456789+-=*/", 2),
    ):
        path = root / f"{name}.txt"
        path.write_text(_domain_text(alphabet, seed))
        domains.append(str(path))
    calib = root / "corpus.txt"
    calib.write_text(synthetic_text(1500))
    torch.manual_seed(0)
    parent = carved_tiny(calib, tokenizer, **CARVE)
    children = []
    for domain in domains:
        child = copy.deepcopy(parent)
        params = [p for brick in carved_layers(child).values() for p in brick.parameters()]
        train_lm_(child, params, tokenizer, domain, TrainConfig(512, 32, 4, 1e-2), progress=False)
        children.append(child)
    return domains, parent, children


@pytest.fixture
def domains(family):
    return family[0]


@pytest.fixture(scope="module")
def merged_family(family, tokenizer):
    """The family's two children merged, and the report (built once: tests must not change it)."""
    return merge_children(family[2], family[0], tokenizer, **MERGE)


def _children(family):
    return [copy.deepcopy(c) for c in family[2]]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tokenizer, path, n=48):
    return torch.tensor([tokenizer(open(path).read()[:400])["input_ids"][:n]])


def test_merge_routes_each_domain_to_its_child_and_equals_it_there(family, merged_family, tokenizer, domains):
    children = _children(family)
    before = [{k: v.clone() for k, v in c.state_dict().items()} for c in children]
    merged, report = merged_family
    again, _ = merge_children(children, domains, tokenizer, **MERGE)  # deterministic
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in merged.state_dict().items())
    assert report.merged_layers == [0, 1] and report.shared_layers == [] and report.averaged == []
    assert sorted(report.accuracy) == [0, 1] and len(report.domain_accuracy) == 2
    assert all(share >= 0.8 for share in report.domain_accuracy), report.summary()
    assert report.heldout_tokens[0] > 0 and report.fit_tokens[0] > report.heldout_tokens[0]
    for child, state in zip(children, before, strict=True):  # the children are not changed
        assert all(torch.equal(v, state[k]) for k, v in child.state_dict().items())

    # On the tokens a layer routes to child i, the layer computes exactly what child i's brick computes.
    layers = layer_modules(merged)
    assert all(isinstance(m, MergedBricks) for m in layers.values())
    seen = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, m in layers.items()
    ]
    ids = torch.cat([_ids(tokenizer, domains[0]), _ids(tokenizer, domains[1])])
    _logits(merged, ids)
    for h in handles:
        h.remove()
    for index, (x, y) in seen.items():
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        choice = layers[index].route(x)
        assert set(choice.tolist()) == {0, 1}  # both children are used
        for i, child in enumerate(children):
            rows = choice == i
            with torch.no_grad():  # float32 sums: the same tokens in a batch of their own
                expected = carved_layers(child)[index](x[rows])
            assert torch.equal(y[rows], expected), (index, i)

    out = merged.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_one_child_merges_to_itself_bit_for_bit(family, tokenizer, domains):
    child = family[2][0]
    merged, report = merge_children([child], domains[:1], tokenizer, **MERGE)
    assert report.merged_layers == [] and report.accuracy == {}
    assert not any(isinstance(m, MergedBricks) for m in merged.modules())
    assert merged.state_dict().keys() == child.state_dict().keys()
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in child.state_dict().items())
    ids = _ids(tokenizer, domains[0])
    assert torch.equal(_logits(merged, ids), _logits(child, ids))


def test_merged_model_saves_and_loads_bit_identically(tmp_path, family, tokenizer, domains):
    children = _children(family)
    norm = "model.norm.weight"
    with torch.no_grad():  # a non-brick weight that differs: averaged, and said so
        dict(children[1].named_parameters())[norm].mul_(1.5)
    merged, report = merge_children(children, domains, tokenizer, **MERGE)
    assert report.averaged == [norm]
    expected = (dict(children[0].named_parameters())[norm] * 1.25).detach()
    assert torch.allclose(dict(merged.named_parameters())[norm], expected)
    bw.save(merged, tmp_path / "merged", tokenizer)
    meta = json.loads((tmp_path / "merged" / "brickwork.json").read_text())
    assert meta["format_version"] == 2
    assert meta["merged"] == {"children": 2, "layers": [0, 1], "domains": report.domains}
    loaded = bw.load(tmp_path / "merged")
    assert "model.layers.0.mlp.branches.1.up" in loaded.state_dict()
    assert loaded.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in merged.state_dict().items())
    ids = torch.cat([_ids(tokenizer, domains[0]), _ids(tokenizer, domains[1])])
    assert torch.equal(_logits(loaded, ids), _logits(merged, ids))
    assert loaded.brickwork.merged["children"] == 2
    # a plain carve still writes (and reads) format 1, without a merged record
    bw.save(children[0], tmp_path / "child", tokenizer)
    meta = json.loads((tmp_path / "child" / "brickwork.json").read_text())
    assert meta["format_version"] == 1 and "merged" not in meta
    plain = bw.load(tmp_path / "child")
    assert not any(isinstance(m, MergedBricks) for m in plain.modules()) and plain.brickwork.merged is None
    assert torch.equal(_logits(plain, ids), _logits(children[0], ids))
    # a damaged merged record is refused before anything is built
    meta = json.loads((tmp_path / "merged" / "brickwork.json").read_text())
    meta["merged"]["children"] = 10**9
    (tmp_path / "merged" / "brickwork.json").write_text(json.dumps(meta))
    with pytest.raises(BrickworkError, match="merged record is damaged"):
        bw.load(tmp_path / "merged")


def test_what_needs_one_carve_refuses_a_merged_model(merged_family, tokenizer, domains):
    from brickwork.io.export import plan_export
    from brickwork.ops.usage import expert_usage

    merged = merged_family[0]
    for call in (
        lambda: plan_export(merged, "qwen2_moe"),
        lambda: bw.set_budget(merged, 0.5),
        lambda: bw.set_token_budget(merged, 0.5),
        lambda: bw.uncarve_(merged),
        lambda: expert_usage(merged, tokenizer, domains[0], tokens=64, window=32, progress=False),
    ):
        with pytest.raises(BrickworkError, match="merged from 2 children"):
            call()
    assert (
        bw.evaluate(merged, tokenizer, domains[0], window=32, max_tokens=128, progress=False).perplexity > 1
    )


def test_mismatched_children_are_refused(family, text_file, tokenizer, domains):
    child = family[1]
    other = carved_tiny(text_file, tokenizer, experts=4, shared=1, active=2)
    with pytest.raises(BrickworkError, match="layer 0 is"):
        merge_children([child, other], domains, tokenizer, **MERGE)
    with pytest.raises(BrickworkError, match="one domain text per child"):
        merge_children([child, child], domains[:1], tokenizer, **MERGE)
    reseeded = carved_tiny(text_file, tokenizer, **CARVE, seed=1)  # same shapes, another grouping
    with pytest.raises(BrickworkError, match="neuron order"):
        average_children([child, reseeded])
    dense = bw.uncarve_(copy.deepcopy(child))
    with pytest.raises(BrickworkError, match="not a carved brickwork model"):
        average_children([child, dense])


def test_average_of_children_and_back_to_dense(family, text_file, tokenizer, domains):
    child = family[1]
    twin = carved_tiny(text_file, tokenizer, **CARVE)  # carved again: the same weights
    same = average_children([child, twin, child])
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in child.state_dict().items())

    children = _children(family)
    averaged = average_children(children)
    for name, p in averaged.named_parameters():
        parts = [dict(c.named_parameters())[name].double() for c in children]
        assert torch.equal(p, ((parts[0] + parts[1]) / 2).float()), name
    dense = [bw.find_ffns(bw.uncarve_(m))[0].read() for m in (averaged, *children)]
    assert torch.equal(dense[0].up, ((dense[1].up.double() + dense[2].up.double()) / 2).float())
    assert torch.equal(dense[0].down, ((dense[1].down.double() + dense[2].down.double()) / 2).float())
    table = domain_perplexities(
        {"average": averaged, "child 0": children[0]},
        tokenizer,
        domains,
        window=32,
        max_tokens=128,
        progress=False,
    )
    assert set(table) == {"average", "child 0"} and all(len(v) == 2 and min(v) > 1 for v in table.values())


def test_cli_merge_and_average(tmp_path, family, tokenizer, domains, capsys):
    from brickwork.cli.main import main as cli

    dirs = []
    for i, child in enumerate(_children(family)):
        dirs.append(str(tmp_path / f"child{i}"))
        bw.save(child, dirs[-1], tokenizer)
    out = tmp_path / "merged"
    args = ["merge", *dirs, "--data", *domains, "--tokens", "1024", "--window", "32", "--out", str(out), "-q"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "router accuracy" in printed and "overall" in printed
    summary = json.loads((out / "merge.json").read_text())
    assert summary["merged_layers"] == [0, 1] and summary["overall_accuracy"] >= 0.8
    assert any(isinstance(m, MergedBricks) for m in bw.load(out).modules())

    assert cli(["merge", *dirs, "--average", "--out", str(tmp_path / "avg"), "-q"]) == 0
    assert "averaged 2 children" in capsys.readouterr().out
    assert not any(isinstance(m, MergedBricks) for m in bw.load(tmp_path / "avg").modules())

    assert cli(["merge", *dirs, "--data", domains[0], "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "one --data text per child" in capsys.readouterr().err
    assert cli(["merge", *dirs, "--average", "--data", *domains, "--out", str(tmp_path / "x"), "-q"]) == 2
    capsys.readouterr()
    assert cli(["merge", *dirs, "--average", "--device", "cuda:99", "--out", str(tmp_path / "z"), "-q"]) == 2
    assert "CUDA device(s)" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_pruned_children_merge_save_and_load(tmp_path, family, tokenizer, domains):
    from brickwork.ops.prune import prune_for_domain_
    from brickwork.ops.usage import expert_usage

    children = _children(family)
    usage = expert_usage(children[0], tokenizer, domains[0], tokens=256, window=32, progress=False)
    for child in children:  # both pruned alike (one carve), each then its own weights
        prune_for_domain_(child, usage, coverage=0.9)
    merged, _ = merge_children(children, domains, tokenizer, **MERGE)
    bw.save(merged, tmp_path / "merged", tokenizer)
    loaded = bw.load(tmp_path / "merged")
    ids = _ids(tokenizer, domains[0])
    assert torch.equal(_logits(loaded, ids), _logits(merged, ids))


def test_grown_children_are_refused(family, tokenizer, domains):
    from brickwork.ops.grow import grow_

    children = _children(family)
    grow_(children[1], tokenizer, domains[1], experts=1, config=TrainConfig(64, 32, 2, 1e-3), progress=False)
    with pytest.raises(BrickworkError, match="merge does not handle grown experts"):
        merge_children(children, domains, tokenizer, **MERGE)
