from __future__ import annotations

import json

import pytest
import torch

import brickwork as bw
from brickwork.bricks.state import carved_layers
from brickwork.cli.main import main as cli
from brickwork.errors import BrickworkError
from brickwork.io.export import (
    build_stock_model,
    compare_logits,
    export,
    load_exported,
    stock_routing_copy,
)
from conftest import bpe_tokenizer, carved_tiny, tiny


def _carved(text_file, tokenizer, model_type="llama", **overrides):
    """Defaults that export: a bias-free fitted router, shared neurons, top-2."""
    options = dict(experts=8, shared=1, active=2, router="fitted", router_options={"intercept": False})
    return carved_tiny(text_file, tokenizer, model_type, **(options | overrides))


def _windows(text_file, tokenizer):
    from brickwork.data.sources import token_windows

    return token_windows(tokenizer, str(text_file), 64, 256)


@pytest.mark.parametrize(
    "model_type, router",
    [("llama", "fitted"), ("mistral", "fitted"), ("qwen2", "fitted"), ("llama", "trained")],
)
def test_top1_qwen2_moe_export_matches_to_float_rounding(tmp_path, text_file, tokenizer, model_type, router):
    options = {"intercept": False} if router == "fitted" else {"intercept": False, "steps": 20}
    model = _carved(text_file, tokenizer, model_type, active=1, router=router, router_options=options)
    report = export(
        model,
        tmp_path / "out",
        "qwen2_moe",
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=256,
        window=64,
    )
    v = report.validation
    assert v["agreement"] == 1.0 and abs(v["kl"]) < 1e-7 and v["max_logit_diff"] < 1e-5
    assert set(report.temperatures.values()) == {1.0}  # top-1: router logits untouched
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["norm_topk_prob"] is True
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("active", [2, 3])
def test_topk_qwen2_moe_export_is_close(tmp_path, text_file, tokenizer, active):
    model = _carved(text_file, tokenizer, active=active)
    report = export(
        model,
        tmp_path / "out",
        "qwen2_moe",
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=256,
        window=64,
    )
    v = report.validation
    assert v["kl"] < 1e-5 and v["agreement"] >= 0.99
    assert all(
        t > 1 and t == 2 ** round(torch.log2(torch.tensor(t)).item()) for t in report.temperatures.values()
    )


def test_the_temperature_is_what_makes_topk_faithful(text_file, tokenizer):
    """At T = 1 the stock softmax weights the experts unequally; the chosen T makes them equal to 1e-3."""
    from brickwork.io.export import _capture_inputs, _temperatures, plan_export

    model = _carved(text_file, tokenizer, active=3)
    with torch.no_grad():  # a router with a realistic logit range (the tiny random one is nearly flat)
        for brick in carved_layers(model).values():
            brick.router.weight.mul_(200)
    windows = _windows(text_file, tokenizer)
    plan = plan_export(model, "qwen2_moe")
    chosen = _temperatures(plan, "qwen2_moe", _capture_inputs(model, plan.bricks, windows))
    plain = compare_logits(model, build_stock_model(model, "qwen2_moe", dict.fromkeys(chosen, 1.0)), windows)
    tempered = compare_logits(model, build_stock_model(model, "qwen2_moe", chosen), windows)
    assert plain["kl"] > 100 * max(tempered["kl"], 1e-9)
    assert tempered["agreement"] == 1.0 and tempered["max_logit_diff"] < 1e-2


def test_mixtral_export_for_carves_without_shared_neurons(tmp_path, text_file, tokenizer):
    model = _carved(text_file, tokenizer, shared=0, active=2, router="centroid", router_options={})
    report = export(
        model,
        tmp_path / "mx",
        "mixtral",
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=256,
        window=64,
    )
    assert json.loads((tmp_path / "mx" / "config.json").read_text())["model_type"] == "mixtral"
    assert report.validation["kl"] < 1e-5 and report.validation["agreement"] >= 0.99


def test_gguf_export_loads_back_with_the_transformers_gguf_reader(tmp_path, text_file, tokenizer):
    model = _carved(text_file, tokenizer, active=2)
    path = tmp_path / "carved.gguf"
    report = export(
        model, path, "gguf", tokenizer, validate_data=str(text_file), validate_tokens=256, window=64
    )
    assert path.is_file() and report.validation["kl"] < 1e-5 and report.validation["agreement"] >= 0.99
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    # llama.cpp's qwen2moe: every block MoE, q/k/v biases, an untied output matrix, f32 router
    assert {
        "output.weight",
        "blk.0.attn_q.bias",
        "blk.1.ffn_gate_exps.weight",
        "blk.1.ffn_gate_inp_shexp.weight",
    } <= names
    shexp = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_inp_shexp.weight").data
    assert 0 < abs(shexp).max() < 1  # llama.cpp's silu(z)/z sigmoid is NaN at z = 0: never a zero gate
    half = tmp_path / "half.gguf"
    export(
        model,
        half,
        "gguf",
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=128,
        window=64,
        dtype="float16",
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(half)).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "F16" and types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_exported_configs_satisfy_the_engines_constraints(tmp_path, text_file, tokenizer):
    """The constraints the README's serving notes list, checked on the written files."""
    model = _carved(text_file, tokenizer, active=2, layers=[1])
    export(
        model,
        tmp_path / "q",
        "qwen2_moe",
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=128,
        window=64,
    )
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["hidden_act"] == "silu"  # vLLM's qwen2_moe supports SiLU only
    assert (
        config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    )  # vLLM derives head_dim
    assert config["mlp_only_layers"] == [0]  # the uncarved layer stays dense
    assert config["num_experts_per_tok"] == 2 and config["num_experts"] == 7
    assert config["qkv_bias"] is True and config["norm_topk_prob"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:  # vLLM loads per-expert keys
        keys = set(f.keys())
    assert (
        "model.layers.1.mlp.experts.6.gate_proj.weight" in keys
        and "model.layers.0.mlp.gate_proj.weight" in keys
    )
    stock = load_exported(tmp_path / "q", "qwen2_moe")
    assert torch.all(stock.model.layers[1].self_attn.q_proj.bias == 0)
    assert torch.all(stock.model.layers[1].mlp.shared_expert_gate.weight == 0)


def test_what_the_stock_formats_cannot_hold_is_refused(tmp_path, text_file, tokenizer):
    with pytest.raises(BrickworkError, match="no carved layer"):
        export(tiny(), tmp_path / "a", "qwen2_moe", tokenizer)
    biased = _carved(text_file, tokenizer, router_options={})
    with pytest.raises(BrickworkError, match="intercept=false"):
        export(biased, tmp_path / "a", "qwen2_moe", tokenizer)
    partial = _carved(text_file, tokenizer, router="partial", router_options={})
    with pytest.raises(BrickworkError, match="not a linear function"):
        export(partial, tmp_path / "a", "qwen2_moe", tokenizer)
    sparse_down = _carved(text_file, tokenizer, down_fraction=0.2)
    with pytest.raises(BrickworkError, match="down-row sparsity"):
        export(sparse_down, tmp_path / "a", "qwen2_moe", tokenizer)
    some_layers = _carved(text_file, tokenizer, layers=[0])
    with pytest.raises(BrickworkError, match="every layer to be MoE"):
        export(some_layers, tmp_path / "a.gguf", "gguf", tokenizer)
    with pytest.raises(BrickworkError, match="mixtral has no shared expert"):
        export(_carved(text_file, tokenizer), tmp_path / "a", "mixtral", tokenizer)
    with pytest.raises(BrickworkError, match="supports carved"):
        export(
            _carved(text_file, tokenizer, "gpt2", router_options={"intercept": False}),
            tmp_path / "a",
            "qwen2_moe",
            tokenizer,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.gguf").exists()


def test_export_command(tmp_path, text_file, tokenizer, capsys):
    model = _carved(text_file, tokenizer, active=1)
    bw.save(model, tmp_path / "carved", tokenizer)
    out, report = tmp_path / "stock", tmp_path / "report.json"
    command = f"export {tmp_path / 'carved'} --format qwen2_moe --out {out} --data {text_file} --tokens 128 --window 64 --json {report} -q"
    assert cli(command.split()) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    assert json.loads(report.read_text())["validation"]["agreement"] == 1.0
    assert cli(f"export {tmp_path / 'carved'} --format mixtral --out {tmp_path / 'm'} -q".split()) == 2
    assert "mixtral has no shared expert" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["qwen2_moe", "gguf"])
def test_stock_routing_conversion_makes_topk_exports_exact(tmp_path, text_file, tokenizer, format):
    model = _carved(text_file, tokenizer, active=3)
    with torch.no_grad():  # a realistic logit range, so that the conversion does change the carve a little
        for brick in carved_layers(model).values():
            brick.router.weight.mul_(200)
    out = tmp_path / ("c.gguf" if format == "gguf" else "c")
    report = export(
        model,
        out,
        format,
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=256,
        window=64,
        stock_routing=True,
    )
    assert report.conversion is not None and report.conversion["max_logit_diff"] > 0  # the carve did change
    v = report.validation  # the export against the converted carve
    assert v["agreement"] == 1.0 and abs(v["kl"]) < 1e-6 and v["max_logit_diff"] < 1e-3
    # the carve itself is untouched; the converted carve is a copy with new specs
    assert {b.combine.rule for b in carved_layers(model).values()} == {"sum"}
    converted = stock_routing_copy(model, format, report.temperatures)
    brick = next(iter(carved_layers(converted).values()))
    assert brick.combine.rule == ("softmax" if format == "gguf" else "softmax_topk")
    bw.save(converted, tmp_path / "saved", tokenizer)
    again = bw.load(tmp_path / "saved")
    assert next(iter(carved_layers(again).values())).combine == brick.combine
    ids = torch.randint(3, 100, (1, 30))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("format", ["qwen2_moe", "gguf"])
def test_export_leaves_the_carved_model_unchanged(tmp_path, text_file, tokenizer, format):
    """Export, stock-routing conversion included, reads the carve and never edits it: the same specs, state dict
    and outputs after as before."""
    model = _carved(text_file, tokenizer, active=3)
    ids = torch.randint(3, 100, (2, 30))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    specs = {i: b.spec for i, b in carved_layers(model).items()}
    out = tmp_path / ("c.gguf" if format == "gguf" else "c")
    export(
        model,
        out,
        format,
        tokenizer,
        validate_data=str(text_file),
        validate_tokens=128,
        window=64,
        stock_routing=True,
    )
    assert {i: b.spec for i, b in carved_layers(model).items()} == specs
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, after[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


@pytest.mark.parametrize(
    "format, combine",
    [
        ("qwen2_moe", "softmax"),
        ("qwen2_moe", "softmax_topk"),
        ("mixtral", "softmax_topk"),
        ("gguf", "softmax"),
        ("glm4_moe", "sigmoid"),
        ("gguf", "sigmoid"),
    ],
)
def test_weighted_carves_export_exactly_without_conversion(tmp_path, text_file, tokenizer, format, combine):
    shared = 0 if format == "mixtral" else 1
    model = _carved(text_file, tokenizer, active=3, shared=shared, combine=combine)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / ("c.gguf" if format == "gguf" else "c")
    report = export(
        model, out, format, tokenizer, validate_data=str(text_file), validate_tokens=256, window=64
    )
    assert report.conversion is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the carve is untouched
    v = report.validation
    assert v["agreement"] == 1.0 and abs(v["kl"]) < 1e-8, v
    bricks = carved_layers(model)
    assert report.temperatures == {i: b.combine.temperature for i, b in bricks.items()}
    if format != "gguf":
        config = json.loads((out / "config.json").read_text())
        assert config.get("norm_topk_prob", True) == (combine == "softmax_topk")
    else:
        from brickwork.io.gguf import gguf_architecture

        assert gguf_architecture(out) == ("glm4moe" if combine == "sigmoid" else "qwen2moe")


def test_glm4_moe_of_a_tied_model_writes_the_head(tmp_path, text_file, tokenizer):
    """vLLM's Glm4MoeForCausalLM never ties lm_head to the embeddings (it stayed zero: uniform output), so a tied
    source is exported untied with the head in the file."""
    from safetensors import safe_open

    model = tiny().eval()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    bw.carve_(
        model,
        bw.CarveConfig(
            experts=8,
            shared=1,
            active=2,
            router="fitted",
            router_options={"intercept": False},
            combine="sigmoid",
            method="random",
            calib_tokens=512,
            router_samples=256,
            window=64,
        ),
        calib=str(text_file),
        tokenizer=tokenizer,
        progress=False,
    )
    out = tmp_path / "g"
    report = export(
        model, out, "glm4_moe", tokenizer, validate_data=str(text_file), validate_tokens=256, window=64
    )
    assert report.validation["agreement"] == 1.0 and abs(report.validation["kl"]) < 1e-8
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), model.get_input_embeddings().weight.detach())


def test_glm4_moe_holds_attention_biases_leading_dense_layers_and_no_shared_experts(
    tmp_path, text_file, tokenizer
):
    """qwen2 attention (q/k/v biases), the first layer left dense (first_k_dense_replace), shared experts or none."""
    for shared, layers in ((1, [1]), (0, None)):
        model = _carved(
            text_file, tokenizer, "qwen2", active=3, shared=shared, combine="sigmoid", layers=layers
        )
        out = tmp_path / f"g{shared}"
        report = export(
            model, out, "glm4_moe", tokenizer, validate_data=str(text_file), validate_tokens=256, window=64
        )
        assert report.validation["agreement"] == 1.0 and abs(report.validation["kl"]) < 1e-8, (
            report.validation
        )
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "glm4_moe" and config["attention_bias"] is True
        assert config["first_k_dense_replace"] == (1 if layers else 0)
        assert config["n_shared_experts"] == shared and config["norm_topk_prob"] is False
        assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    model = _carved(
        text_file, tokenizer, active=3, combine="sigmoid", layers=[0]
    )  # a dense layer after a MoE one
    with pytest.raises(BrickworkError, match="first_k_dense_replace"):
        export(model, tmp_path / "x", "glm4_moe", tokenizer, validate_data=None)


@pytest.mark.parametrize(
    "format, combine, use",
    [
        ("gguf", "softmax_topk", "softmax"),
        ("mixtral", "softmax", "softmax_topk"),
        ("glm4_moe", "softmax", "sigmoid"),
    ],
)
def test_a_rule_the_format_cannot_compute_is_refused(tmp_path, text_file, tokenizer, format, combine, use):
    shared = 0 if format == "mixtral" else 1
    model = _carved(text_file, tokenizer, active=2, shared=shared, combine=combine)
    out = tmp_path / ("c.gguf" if format == "gguf" else "c")
    with pytest.raises(BrickworkError, match=f"--combine {use}"):
        export(model, out, format, tokenizer, validate_data=str(text_file), validate_tokens=128, window=64)
    assert not out.exists()


def test_gguf_names_the_pre_tokenizer_llama_cpp_knows(tmp_path, text_file, tokenizer, caplog):
    import gguf

    from brickwork.io.gguf import _PRE_TOKENIZERS, pre_tokenizer_name

    model = _carved(text_file, tokenizer, active=2, combine="softmax")
    bpe = bpe_tokenizer(text_file, model.config.vocab_size)
    path = tmp_path / "c.gguf"
    export(model, path, "gguf", bpe, validate_data=str(text_file), validate_tokens=128, window=64)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    # BOS/EOS around encoded text as transformers puts them (this tokenizer adds neither)
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is False
    assert reader.get_field("tokenizer.ggml.add_eos_token").contents() is False
    # a BPE tokenizer of no family llama.cpp knows: "default", with a warning saying what that risks
    assert reader.get_field("tokenizer.ggml.pre").contents() == pre_tokenizer_name(bpe) == "default"
    assert "may split text differently" in caplog.text
    # the known families are looked up by llama.cpp's own hash of the test string's token ids
    assert set(_PRE_TOKENIZERS.values()) >= {"smollm", "qwen2", "llama-bpe"}


@pytest.mark.parametrize(
    "active, combine, layers",
    [(1, "sum", None), (2, "sum", [1]), (3, "softmax_topk", None), (2, "softmax", None)],
)
def test_qwen3_moe_export_of_a_carved_qwen3(tmp_path, text_file, tokenizer, active, combine, layers):
    """Qwen3 attention (q/k norms, explicit head_dim) maps as it is; no shared expert; dense layers stay dense."""
    model = _carved(text_file, tokenizer, "qwen3", active=active, shared=0, combine=combine, layers=layers)
    out = tmp_path / "q3"
    report = export(
        model, out, "qwen3_moe", tokenizer, validate_data=str(text_file), validate_tokens=256, window=64
    )
    v = report.validation
    exact = combine != "sum" or active == 1
    assert v["agreement"] == 1.0 and abs(v["kl"]) < (1e-8 if exact else 1e-6), v
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == 8  # num_experts in memory
    assert config["norm_topk_prob"] == (combine != "softmax")
    assert config["mlp_only_layers"] == ([0] if layers else [])
    assert config["head_dim"] == model.config.head_dim
    stock = load_exported(out, "qwen3_moe")
    assert torch.equal(
        stock.model.layers[0].self_attn.q_norm.weight, model.model.layers[0].self_attn.q_norm.weight
    )


def test_qwen3_moe_takes_qwen3_alone_and_no_shared_neurons(tmp_path, text_file, tokenizer):
    from brickwork.io.export import plan_export

    with pytest.raises(BrickworkError, match="supports carved qwen3 models"):
        plan_export(_carved(text_file, tokenizer, shared=0), "qwen3_moe")  # Llama attention has no q/k norms
    with pytest.raises(BrickworkError, match="this model is 'qwen3': export it to qwen3_moe"):
        plan_export(_carved(text_file, tokenizer, "qwen3"), "qwen2_moe")
    with pytest.raises(BrickworkError, match="qwen3_moe has no shared expert.*--shared 0"):
        plan_export(_carved(text_file, tokenizer, "qwen3", shared=1), "qwen3_moe")
    with pytest.raises(BrickworkError, match="no export format holds a 'sigmoid' carve of a qwen3 model"):
        plan_export(_carved(text_file, tokenizer, "qwen3", shared=0, combine="sigmoid"), "qwen3_moe")


def test_deepseek_v3_is_refused_with_the_reason_and_the_format_that_holds_its_router(
    tmp_path, text_file, tokenizer, capsys
):
    """DeepSeek-V3's MLA cannot hold Llama-style attention exactly; glm4_moe is its router with that attention."""
    from brickwork.io.formats import get_format

    model = _carved(text_file, tokenizer, active=2, combine="sigmoid")
    message = get_format("deepseek_v3").supports(model)
    assert "Multi-head Latent Attention" in message and "--format glm4_moe" in message
    assert get_format("glm4_moe").supports(model) is None
    bw.save(model, tmp_path / "carved", tokenizer)
    assert (
        cli(
            f"export {tmp_path / 'carved'} --format deepseek_v3 --out {tmp_path / 'd'} --no-validate -q".split()
        )
        == 2
    )
    assert "--format glm4_moe" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_every_registered_format_declares_what_it_holds():
    """The registry is the one list of formats: each names itself, its sources and rules, and the CLI offers it."""
    from brickwork.cli.main import build_parser
    from brickwork.io.formats import EXPORT_FORMATS, default_format

    for name, cls in EXPORT_FORMATS.items():
        assert cls.name == name
        assert cls.suffix or cls.model_class.endswith(
            "ForCausalLM"
        )  # a file format names its models per plan
        assert set(cls.rules) <= {"softmax", "softmax_topk", "sigmoid"}
    parser = build_parser()
    export_parser = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "export")[
        1
    ]
    choices = next(a.choices for a in export_parser._actions if a.dest == "format")
    assert list(choices) == list(EXPORT_FORMATS)
    assert default_format("x.gguf", {"sigmoid"}) == "gguf"
    assert default_format("x", {"sigmoid"}) == "glm4_moe"
    assert default_format("x", {"sum"}) == default_format("x", set()) == "qwen2_moe"


def _carved_qwen3(text_file, tokenizer, head_dim=8, tied=False, attention_bias=False, **overrides):
    """A carved tiny qwen3 whose heads x head_dim may differ from hidden (as real Qwen3 models' do)."""
    import transformers as tf

    from brickwork.models.tiny import TINY_FFN, TINY_HIDDEN, TINY_VOCAB

    config = tf.Qwen3Config(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        attention_bias=attention_bias,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(config).eval()
    options = dict(experts=8, shared=0, active=2, router="fitted", router_options={"intercept": False})
    options |= dict(method="random", calib_tokens=512, router_samples=256, window=64) | overrides
    bw.carve_(model, bw.CarveConfig(**options), calib=str(text_file), tokenizer=tokenizer, progress=False)
    return model


@pytest.mark.parametrize(
    "active, combine, head_dim, tied",
    [(3, "softmax_topk", 16, False), (1, "sum", 8, True), (2, "sum", 16, False)],
)
def test_gguf_of_a_carved_qwen3_is_llama_cpps_qwen3moe(
    tmp_path, text_file, tokenizer, active, combine, head_dim, tied
):
    """q/k norms and head_dim as they are, every block MoE with no shared expert, top-k weights renormalised (so
    softmax_topk and top-1 sum exactly); the tensors are the ones llama.cpp's qwen3moe loader requires."""
    import gguf

    from brickwork.io.gguf import gguf_architecture

    model = _carved_qwen3(text_file, tokenizer, head_dim, tied, active=active, combine=combine)
    out = tmp_path / "q3.gguf"
    report = export(
        model, out, "gguf", tokenizer, validate_data=str(text_file), validate_tokens=256, window=64
    )
    v = report.validation
    exact = combine != "sum" or active == 1
    assert v["agreement"] == 1.0 and abs(v["kl"]) < (1e-8 if exact else 1e-6), v
    if exact:
        bricks = carved_layers(model)
        assert report.temperatures == {
            i: (b.combine.temperature if combine != "sum" else 1.0) for i, b in bricks.items()
        }
    assert gguf_architecture(out) == "qwen3moe"
    reader = gguf.GGUFReader(str(out))
    meta = {k.split(".", 1)[1]: f.contents() for k, f in reader.fields.items() if k.startswith("qwen3moe.")}
    assert meta["attention.key_length"] == meta["attention.value_length"] == head_dim
    assert (meta["expert_count"], meta["expert_used_count"], meta["expert_feed_forward_length"]) == (
        8,
        active,
        8,
    )
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    # what llama.cpp's qwen3moe loader creates as required, in its orientation (ne: columns first)
    required = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}.weight"
        for i in range(2)
        for name in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "attn_q_norm",
            "attn_k_norm",
            "ffn_norm",
            "ffn_gate_inp",
            "ffn_gate_exps",
            "ffn_up_exps",
            "ffn_down_exps",
        ]
    }
    assert required <= set(shapes) and ("output.weight" in shapes) != tied
    assert shapes["blk.0.attn_q_norm.weight"] == [head_dim] and shapes["blk.0.attn_q.weight"] == [
        32,
        4 * head_dim,
    ]
    assert shapes["blk.1.ffn_gate_exps.weight"] == [32, 8, 8] and shapes["blk.1.ffn_down_exps.weight"] == [
        8,
        32,
        8,
    ]
    # every name is one the gguf package's qwen3moe architecture lists
    known = {
        gguf.TENSOR_NAMES[t].format(bid=i)
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]
        for i in (0, 1)
    }
    assert {name.rsplit(".", 1)[0] for name in shapes} <= known
    stock = load_exported(out, "gguf")
    assert type(stock).__name__ == "Qwen3MoeForCausalLM" and stock.config.norm_topk_prob is True
    assert torch.equal(
        stock.model.layers[1].self_attn.k_norm.weight, model.model.layers[1].self_attn.k_norm.weight
    )


def test_gguf_qwen3moe_refuses_what_llama_cpp_cannot_hold(tmp_path, text_file, tokenizer):
    from brickwork.io.export import plan_export
    from brickwork.io.formats.gguf_qwen3moe import LlamaCppQwen3Moe

    refusals = [
        (dict(shared=1), r"llama.cpp's qwen3moe has no shared expert.*--shared 0"),
        (dict(combine="softmax"), "always renormalises the top-k weights: carve with --combine softmax_topk"),
        (dict(combine="sigmoid"), "no export format holds a 'sigmoid' carve of a qwen3 model"),
        (dict(layers=[1]), r"layers \[0\] are dense.*export to qwen3_moe"),
        (dict(attention_bias=True), "attention output biases have no place"),
    ]
    for overrides, message in refusals:
        with pytest.raises(BrickworkError, match=message):
            plan_export(_carved_qwen3(text_file, tokenizer, **overrides), "gguf")
    # a Llama-style attention has no q/k norms: its carves go to qwen2moe, never to qwen3moe
    llama = _carved(text_file, tokenizer, shared=0, combine="softmax_topk")
    with pytest.raises(BrickworkError, match="supports carved qwen3 models"):
        LlamaCppQwen3Moe().plan(llama)
    with pytest.raises(
        BrickworkError, match="qwen2moe does not renormalise.*export it to qwen2_moe or mixtral$"
    ):
        plan_export(llama, "gguf")
    out = tmp_path / "c.gguf"
    with pytest.raises(BrickworkError, match="--shared 0"):
        export(_carved_qwen3(text_file, tokenizer, shared=1), out, "gguf", tokenizer, validate_data=None)
    assert not out.exists()
