"""What every stock export format shares: the plan of a carve, the checks common to all formats, the interface.

Formats are described after mergekit's ``MoEOutputArchitecture`` (Goddard et al., "Arcee's MergeKit", 2024): each
format is one class in its own file that declares its name, what it accepts (``sources``, ``rules``, ``check``,
with the refusals), its transformers ``config``, its MoE ``layer_tensors``, and how its output is written and
loaded back. :meth:`StockFormat.plan` runs the common checks once for all of them, then the format's own.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from brickwork.bricks.module import BrickFFN
from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError

EXPORT_MARKER = "brickwork-export"  # brickwork-export.json's format: what check_output_dir recognises
LLAMA_SOURCES = ("llama", "mistral", "qwen2")


@dataclass
class ExportPlan:
    """What a carve holds, as every stock format needs it: one shape and one combine rule for all layers."""

    bricks: dict[int, BrickFFN]
    num_experts: int
    expert_size: int
    active: int
    shared: int
    rule: str  # the carve's combine rule (one for every layer)
    source: str = ""  # the carved model's model_type

    def dense_layers(self, num_layers: int) -> list[int]:
        return sorted(set(range(num_layers)) - set(self.bricks))


class StockFormat:
    """One export format. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    # the transformers causal-LM class that loads the output (a name in ``transformers``)
    model_class: ClassVar[str]
    # source model types whose attention and FFN the format holds, and how to say so in a refusal
    sources: ClassVar[tuple[str, ...]] = LLAMA_SOURCES
    source_description: ClassVar[str] = "Llama-style attention and SwiGLU FFN"
    # the weighted combine rules (brickwork.bricks.combine) the stock router computes, and the advice on others
    rules: ClassVar[tuple[str, ...]] = ()
    rule_hint: ClassVar[str] = ""
    # combine rules for which this is the format ``export`` picks when none is named
    default_for_rules: ClassVar[tuple[str, ...]] = ()
    # whether the router renormalises the top-k probabilities of a ``sum`` carve (then top-1 exports exactly)
    renormalises_sum: ClassVar[bool] = True
    # engines that derive head_dim as hidden / heads (vLLM's Qwen2-MoE) need them to agree
    derives_head_dim: ClassVar[bool] = True
    # a file format's suffix (the output is one file); None: a transformers model directory
    suffix: ClassVar[str | None] = None

    # --- what the format supports ------------------------------------------------------------------------
    def plan(self, model) -> ExportPlan:
        """The carve's :class:`ExportPlan`, or BrickworkError saying what this format cannot hold and what to do."""
        config = model.config
        if config.model_type not in self.sources:
            from brickwork.io.formats import EXPORT_FORMATS

            others = [name for name, cls in EXPORT_FORMATS.items() if config.model_type in cls.sources]
            raise BrickworkError(
                f"export to {self.name} supports carved {', '.join(self.sources)} models "
                f"({self.source_description}); this model is '{config.model_type}'"
                + (f": export it to {' or '.join(others)}" if others else "")
            )
        bricks = carved_layers(model)
        if not bricks:
            raise BrickworkError("the model has no carved layer: carve it first (brickwork carve)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise BrickworkError(f"stock MoE experts use SiLU; this model's FFN uses '{config.hidden_act}'")
        self.check_attention(config)
        grown = sorted(index for index, brick in bricks.items() if brick.grown is not None)
        if grown:
            raise BrickworkError(
                f"layers {grown} hold grown bricks (brickwork.ops.grow), which stock MoE formats have no place "
                "for; export the model they were grown on (or remove them with brickwork.ops.grow.remove_grown_)"
            )
        specs = {index: brick.spec for index, brick in bricks.items()}
        budgeted = sorted(index for index, spec in specs.items() if spec.token_budget is not None)
        if budgeted:
            raise BrickworkError(
                f"layers {budgeted} choose how many experts each token runs (a per-token budget); stock MoE "
                "engines run a fixed top-k: remove it with brickwork.set_token_budget(model, None) (and save "
                "again) before exporting"
            )
        shapes = {(b.num_experts, b.expert_size, b.active, b.num_shared) for b in specs.values()}
        if len(shapes) > 1:
            raise BrickworkError(
                f"carved layers differ in experts / expert size / top-k / shared neurons ({sorted(shapes)}); "
                "stock MoE configs hold one value of each for the whole model"
            )
        num_experts, expert_size, active, shared = shapes.pop()
        rules = {b.combine.rule for b in specs.values()}
        if len(rules) > 1:
            raise BrickworkError(
                f"carved layers combine experts differently ({sorted(rules)}); a stock MoE config has one "
                "router rule"
            )
        rule = rules.pop()
        if rule != "sum" and rule not in self.rules:
            from brickwork.io.formats import EXPORT_FORMATS

            fits = [name for name, cls in EXPORT_FORMATS.items() if cls.holds(config.model_type, rule)]
            where = (
                f"export it to {' or '.join(fits)}"
                if fits
                else f"no export format holds a '{rule}' carve of a {config.model_type} model"
            )
            raise BrickworkError(
                f"this carve weights its experts by '{rule}', which {self.name} cannot compute "
                f"({self.rule_hint}); {where}"
            )
        for index, spec in specs.items():
            if spec.down_keep is not None:
                raise BrickworkError(
                    f"layer {index} uses down-row sparsity (down_fraction), which stock experts cannot express"
                )
            if spec.up_bias or spec.gate_bias or spec.down_bias:
                raise BrickworkError(f"layer {index} has FFN biases; stock MoE experts have none")
            if not spec.gated:
                raise BrickworkError(f"layer {index} is not a gated (SwiGLU) FFN")
            form = bricks[index].router.linear_form()
            if form is None:
                raise BrickworkError(
                    f"layer {index}'s router '{spec.router}' is not a linear function of the FFN input; stock "
                    "MoE gates are one Linear layer. Carve with --router fitted (router option intercept=false) "
                    "or --router centroid."
                )
            if form[1] is not None and bool(form[1].detach().abs().max() > 0):
                raise BrickworkError(
                    f"layer {index}'s router has a bias; stock MoE gates have none. Carve with the fitted "
                    "router's option intercept=false (brickwork carve --router-option intercept=false)."
                )
        if num_experts < 2 or active >= num_experts:
            raise BrickworkError("export needs routed experts to choose from (active < experts)")
        plan = ExportPlan(bricks, num_experts, expert_size, active, shared, rule, config.model_type)
        self.check(plan, config.num_hidden_layers)
        return plan

    @classmethod
    def holds(cls, model_type: str, rule: str) -> bool:
        """Whether the format computes weighted combine ``rule`` for a carved ``model_type`` model."""
        return model_type in cls.sources and rule in cls.rules

    def supports(self, model) -> str | None:
        """None when this format holds the carved ``model``, else the reason it does not (what :meth:`plan`
        raises)."""
        try:
            self.plan(model)
        except BrickworkError as exc:
            return str(exc)
        return None

    def check_attention(self, config) -> None:
        """Refuse attention that the format's Llama-style attention does not hold."""
        window = getattr(config, "sliding_window", None)
        if window and window < config.max_position_embeddings and config.model_type == "mistral":
            raise BrickworkError(
                f"sliding-window attention (window {window} < {config.max_position_embeddings} positions) does "
                "not export to these formats"
            )
        if getattr(config, "mlp_bias", False) or (
            getattr(config, "attention_bias", False) and not self.holds_attention_bias(config)
        ):
            raise BrickworkError("FFN or attention output biases have no place in the stock MoE formats")
        if self.derives_head_dim:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            if head_dim * config.num_attention_heads != config.hidden_size:
                raise BrickworkError(
                    "heads x head_dim differs from hidden_size; Qwen2-MoE engines (vLLM) assume they are equal"
                )

    def holds_attention_bias(self, config) -> bool:
        """Whether ``config.attention_bias`` has a place here: Qwen2's q/k/v biases do (zero where absent)."""
        return config.model_type == "qwen2"

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        """The format's own refusals, after the common ones (BrickworkError)."""

    # --- routing -----------------------------------------------------------------------------------------
    def exact(self, plan: ExportPlan) -> bool:
        """A weighted combine rule the format computes (:meth:`plan` checked it), or top-1 with renormalisation:
        the selected expert's weight is exactly 1 at any temperature."""
        return plan.rule != "sum" or (plan.active == 1 and self.renormalises_sum)

    def sum_share(self, plan: ExportPlan) -> int:
        """How many probabilities a ``sum`` carve's selected experts share: top-k when renormalised, else all."""
        return plan.active if self.renormalises_sum else plan.num_experts

    def sum_rule(self) -> str:
        """The weighted rule this format's router computes on a ``sum`` carve (see ``stock_routing_copy``)."""
        return "softmax_topk" if self.renormalises_sum else "softmax"

    def needs_inputs(self, plan: ExportPlan) -> bool:
        """Whether the export needs FFN inputs even when the routing is exact (see :meth:`shared_gates`)."""
        return False

    def shared_gates(self, plan: ExportPlan, inputs: dict | None) -> dict[int, torch.Tensor] | None:
        """Per-layer shared-expert gate vectors to write instead of zeros (None: zeros or no gate)."""
        return None

    # --- the stock model ---------------------------------------------------------------------------------
    def stock(self, plan: ExportPlan) -> StockFormat:
        """The format whose transformers model is built for ``plan`` and whose router the export's routing is
        chosen for (a file format names one per plan)."""
        return self

    def config(self, model, plan: ExportPlan):
        """The stock transformers config (``PretrainedConfig``)."""
        raise NotImplementedError

    def layer_tensors(
        self, brick: BrickFFN, plan: ExportPlan, temperature: float, scale: float, dtype, shared_gate=None
    ) -> dict[str, torch.Tensor]:
        """A carved layer's tensors under ``model.layers.N.mlp.``: the router divided by ``temperature`` and the
        routed experts (down projections times ``scale``); formats add their shared experts."""
        weight, _ = brick.router.linear_form()
        gate_up, down = routed_experts(brick, plan, scale)
        return {
            "gate.weight": (weight.detach() / temperature).to(dtype),
            "experts.gate_up_proj": gate_up,
            "experts.down_proj": down,
        }

    @torch.no_grad()
    def build(self, model, plan: ExportPlan, temperatures: dict[int, float], shared_gates=None):
        """The stock transformers model that computes what the carved ``model`` computes."""
        import transformers as tf

        config = self.config(model, plan)
        dtype = next(model.parameters()).dtype
        stock = getattr(tf, self.model_class)(config).to(dtype).eval()
        source = model.state_dict()
        target = stock.state_dict()
        out: dict[str, torch.Tensor] = {}
        for name in target:
            if ".mlp." in name:
                continue
            if name in source:
                out[name] = source[name]
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                out[name] = torch.zeros_like(target[name])  # the source had no q/k/v bias
            elif name == "lm_head.weight":
                out[name] = source["model.embed_tokens.weight"]
            else:
                raise BrickworkError(f"no source weight for {name}; cannot export this model")
        # a weighted rule's scale; sum: 1 when exact (top-1 renormalised), else the probabilities' share
        sum_scale = 1.0 if self.exact(plan) else float(self.sum_share(plan))
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp."
            brick = plan.bricks.get(layer)
            if brick is None:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    out[prefix + proj + ".weight"] = source[prefix + proj + ".weight"]
                continue
            scale = brick.spec.combine.scale if plan.rule != "sum" else sum_scale
            gate = None if shared_gates is None else shared_gates[layer]
            tensors = self.layer_tensors(brick, plan, temperatures[layer], scale, dtype, gate)
            out.update({prefix + name: tensor for name, tensor in tensors.items()})
        missing = set(target) - set(out)
        if missing:
            raise BrickworkError(f"export left weights unset: {sorted(missing)[:5]}")
        stock.load_state_dict(out, strict=True)
        if config.tie_word_embeddings:
            stock.tie_weights()
        return stock

    # --- writing and loading back ------------------------------------------------------------------------
    def check_output(self, out: Path, overwrite: bool, inputs: tuple) -> Path:
        """Refuse, before any work, an output that cannot or may not be written (BrickworkError)."""
        from brickwork.io_utils import check_output_dir

        return check_output_dir(out, "export", overwrite, inputs)

    def output(self, out: Path, overwrite: bool, sources: tuple) -> contextlib.AbstractContextManager[Path]:
        """The atomic output: a temporary that replaces ``out`` when the block succeeds."""
        from brickwork.io_utils import atomic_directory

        return atomic_directory(out, "export", overwrite, sources)

    def write(self, stock, tmp: Path, tokenizer, dtype: str) -> None:
        """Write ``stock`` (and the tokenizer) into the temporary output ``tmp``."""
        if dtype == "float16":
            stock = stock.half()
        stock.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    def finish(self, tmp: Path, report, started: float) -> None:
        """After validation, inside the atomic block: a directory export carries ``brickwork-export.json``."""
        from brickwork.io_utils import atomic_write_text

        report.seconds = time.perf_counter() - started
        atomic_write_text(tmp / "brickwork-export.json", json.dumps(export_record(report), indent=2))

    def load(self, path: Path):
        """The output as stock ``transformers`` loads it (no ``trust_remote_code``), in float32."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def export_record(report) -> dict:
    """``brickwork-export.json``: the report, with the format it was exported to as ``export_format`` (``format``
    is the marker that says the directory is a brickwork export)."""
    from brickwork.version import __version__

    record = report.to_dict()
    record["export_format"] = record.pop("format")
    return {"format": EXPORT_MARKER, "brickwork_version": __version__, **record}


def routed_experts(brick: BrickFFN, plan: ExportPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts stacked as transformers holds them: ``gate_up [E, 2 size, D]``, ``down [E, D, size]``
    (times ``scale``)."""
    s, e, size, d = plan.shared, plan.num_experts, plan.expert_size, brick.spec.d_model
    gate, up, down_t = brick.gate.detach(), brick.up.detach(), brick.down_t.detach()
    routed = slice(s, s + e * size)
    gate_up = torch.cat([gate[routed].view(e, size, d), up[routed].view(e, size, d)], dim=1)
    return gate_up, (down_t[routed].view(e, size, d).transpose(1, 2) * scale).contiguous()


def shared_neurons(brick: BrickFFN, plan: ExportPlan, down_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The shared neurons as one dense SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj`` weights)."""
    s = plan.shared
    down = brick.down_t.detach()[:s].t()
    return {
        "gate_proj.weight": brick.gate.detach()[:s],
        "up_proj.weight": brick.up.detach()[:s],
        "down_proj.weight": (down * down_scale if down_scale != 1.0 else down).contiguous(),
    }


def require_every_layer(name: str, plan: ExportPlan, num_layers: int, instead: str = "qwen2_moe") -> None:
    """Refuse dense layers for a format whose every layer is MoE, naming the format that keeps them (``instead``)."""
    if len(plan.bricks) != num_layers:
        raise BrickworkError(
            f"{name} needs every layer to be MoE; layers {plan.dense_layers(num_layers)} are dense. Carve every "
            f"layer, or export to {instead} (which keeps dense layers as mlp_only_layers)."
        )


def common_config(config) -> dict:
    """The config entries every stock format takes from a Llama-style source."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
        attention_dropout=0.0,
    )
    rope = getattr(config, "rope_parameters", None)
    if rope is not None:
        out["rope_parameters"] = dict(rope)
    return out
