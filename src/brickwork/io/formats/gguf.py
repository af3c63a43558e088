"""``gguf``: one GGUF file for llama.cpp, in its ``qwen2moe`` architecture (``softmax`` and ``sum`` carves) or
``glm4moe`` (``sigmoid`` carves); f32 or f16 tensors, the router stays f32 (the file itself: :mod:`brickwork.io.gguf`).

llama.cpp's qwen2moe never renormalises the top-k probabilities and needs every layer to be MoE with a shared
expert. It evaluates the shared gate as silu(z)/z, NaN at z = 0, so the GGUF shared gate is a tiny vector
(|w . x| about 1e-7 on the validation tokens) rather than zero; the shared expert is then off by about that much,
relative. glm4moe's shared experts have no gate; llama.cpp's loader expects at least one. The file is loaded back
with transformers' GGUF reader (qwen2moe) or brickwork's reader of its own glm4moe files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat, require_every_layer
from brickwork.io.formats.glm4_moe import Glm4Moe, check_leading_dense, check_whole_shared_experts
from brickwork.io.formats.qwen2_moe import Qwen2Moe, require_shared

# Typical |w . x| of the shared expert's gate (see shared_gate_directions). At 1e-7, sigmoid(w . x) rounds to 1/2
# in fp32 for most tokens (the spacing of fp32 near 1/2 is 6e-8), yet w . x stays far from zero and from fp32's
# smallest normal numbers (the gate is stored f32 even in f16 files).
_SHARED_GATE_LOGIT = 1e-7


class LlamaCppQwen2Moe(Qwen2Moe):
    """The Qwen2-MoE model of a qwen2moe GGUF file: llama.cpp never renormalises the top-k probabilities."""

    renormalises_sum = False


class LlamaCppGlm4Moe(Glm4Moe):
    """The GLM-4-MoE model of a glm4moe GGUF file: the writer stores the output matrix in any case."""

    unties_head = False


class Gguf(StockFormat):
    name = "gguf"
    rules = ("softmax", "sigmoid")  # llama.cpp's qwen2moe (softmax, never renormalised) or glm4moe (sigmoid)
    rule_hint = (
        "llama.cpp's qwen2moe does not renormalise the top-k weights: carve with --combine softmax "
        "(or sigmoid, for its glm4moe)"
    )
    renormalises_sum = False
    suffix = ".gguf"

    def check(self, plan: ExportPlan, num_layers: int) -> None:
        if plan.rule == "sigmoid":
            dense = check_leading_dense(plan, num_layers)
            if dense:
                raise BrickworkError(f"layers {dense} are dense: carve every layer for a GGUF export")
            if not plan.shared:
                raise BrickworkError(
                    "llama.cpp's glm4moe expects shared experts; this carve has none: carve with --shared > 0, "
                    "or export to glm4_moe"
                )
            check_whole_shared_experts(plan)
            return
        require_every_layer(self.name, plan, num_layers)
        require_shared(self.name, plan)

    def stock(self, plan: ExportPlan) -> StockFormat:
        return LlamaCppGlm4Moe() if plan.rule == "sigmoid" else LlamaCppQwen2Moe()

    def needs_inputs(self, plan: ExportPlan) -> bool:
        return plan.rule != "sigmoid"  # the qwen2moe shared gate is set on them

    def shared_gates(self, plan: ExportPlan, inputs: dict | None) -> dict[int, torch.Tensor] | None:
        if not self.needs_inputs(plan):
            return None
        if inputs is None:
            raise BrickworkError(
                "a GGUF export needs validation windows (validate_data) to set the shared gate"
            )
        return shared_gate_directions(inputs)

    def check_output(self, out: Path, overwrite: bool, inputs: tuple) -> Path:
        if out.suffix != self.suffix:
            raise BrickworkError(f"a GGUF output path must end in .gguf, got {out}")
        if out.is_dir():
            raise BrickworkError(f"the output {out} is a directory; --format gguf writes one .gguf file")
        for source in inputs:
            if source is not None and Path(source).exists() and Path(source).resolve() == out.resolve():
                raise BrickworkError(f"the output {out} is the input; choose another --out")
        if out.exists() and not overwrite and not _is_brickwork_gguf(out):
            raise BrickworkError(
                f"{out} exists and is not a brickwork export; refusing to replace it. Choose another --out, or "
                "pass --overwrite"
            )
        return out

    def output(self, out: Path, overwrite: bool, sources: tuple) -> contextlib.AbstractContextManager[Path]:
        from brickwork.io_utils import atomic_file

        return atomic_file(out)

    def write(self, stock, tmp: Path, tokenizer, dtype: str) -> None:
        from brickwork.io.gguf import write_gguf_file

        write_gguf_file(stock, tmp, tokenizer, dtype=dtype)

    def finish(self, tmp: Path, report, started: float) -> None:
        pass  # the file is the whole output

    def load(self, path: Path):
        from transformers import AutoModelForCausalLM

        from brickwork.io.gguf import gguf_architecture, read_glm4moe_gguf, read_qwen2moe_config

        path = Path(path)
        if gguf_architecture(path) == "glm4moe":  # transformers has no glm4moe GGUF reader
            return read_glm4moe_gguf(path)
        # transformers' GGUF reader (5.x) maps no expert or shared-expert sizes for qwen2moe, so the config is
        # rebuilt from the file's own metadata (nothing here comes from brickwork's side)
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=read_qwen2moe_config(path), dtype=torch.float32
        ).eval()


@torch.no_grad()
def shared_gate_directions(inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per carved layer, a gate vector w with |w . x| about 1e-7 on its captured FFN inputs x (along their mean).

    llama.cpp computes the shared expert's sigmoid gate as silu(z) / z, which is NaN at z = 0, so the GGUF
    export cannot zero the gate as the safetensors formats do: sigmoid(w . x) = 1/2 + w . x / 4 instead, a
    relative error of about |w . x| / 2 on the shared expert after the factor 2.
    """
    out = {}
    for index, x in inputs.items():
        total = x.sum(0)
        direction = total / total.norm().clamp_min(1e-12)
        typical = (x @ direction).abs().median().clamp_min(1e-12)
        out[index] = direction * (_SHARED_GATE_LOGIT / typical)
    return out


def _is_brickwork_gguf(path: Path) -> bool:
    from brickwork.models.loading import open_gguf

    try:
        field = open_gguf(path).get_field("general.name")
    except BrickworkError:  # an unreadable file is not ours
        return False
    return field is not None and field.contents() == "brickwork export"
