"""``gguf``: one GGUF file for llama.cpp, in the llama.cpp architecture that holds the carve: ``qwen2moe``
(Llama-style carves, ``softmax`` and ``sum``, with shared neurons), ``glm4moe`` (``sigmoid``) or ``qwen3moe``
(carved ``qwen3``, ``softmax_topk`` and ``sum``, no shared neurons); f32 or f16 tensors, the router stays f32.

Each architecture is a class in its own file (``gguf_qwen2moe``, ``gguf_glm4moe``, ``gguf_qwen3moe``): the export
format whose transformers model it writes, with llama.cpp's refusals, tensor names, metadata and its reader; the
file itself is written by :mod:`brickwork.io.gguf`. This format picks the architecture for the carve's source and
combine rule and leaves the rest to it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from brickwork.bricks.state import carved_layers
from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat
from brickwork.io.formats.gguf_glm4moe import LlamaCppGlm4Moe
from brickwork.io.formats.gguf_qwen2moe import LlamaCppQwen2Moe
from brickwork.io.formats.gguf_qwen3moe import LlamaCppQwen3Moe

# In the order an architecture is picked: the first that holds the source and the carve's rule, else the first
# that holds the source (whose refusal then says what to change)
ARCHITECTURES = (LlamaCppQwen2Moe, LlamaCppGlm4Moe, LlamaCppQwen3Moe)


class Gguf(StockFormat):
    name = "gguf"
    sources = tuple(dict.fromkeys(source for arch in ARCHITECTURES for source in arch.sources))
    source_description = "Llama-style attention, or Qwen3's with q/k norms, and SwiGLU FFN"
    rules = tuple(dict.fromkeys(rule for arch in ARCHITECTURES for rule in arch.rules))
    suffix = ".gguf"

    @classmethod
    def holds(cls, model_type: str, rule: str) -> bool:
        return any(arch.holds(model_type, rule) for arch in ARCHITECTURES)

    @staticmethod
    def architecture(model_type: str, rule: str | None):
        """The llama.cpp architecture written for a ``model_type`` carve with combine ``rule`` (None: unknown)."""
        candidates = [arch for arch in ARCHITECTURES if model_type in arch.sources]
        return next(
            (arch for arch in candidates if rule in arch.rules), candidates[0] if candidates else None
        )

    def plan(self, model) -> ExportPlan:
        rules = {brick.combine.rule for brick in carved_layers(model).values()}
        arch = self.architecture(model.config.model_type, rules.pop() if len(rules) == 1 else None)
        if arch is None:
            return super().plan(model)  # refuses the source, naming the formats that take it
        return arch().plan(model)

    def stock(self, plan: ExportPlan) -> StockFormat:
        return self.architecture(plan.source, plan.rule)()

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

        arch = next((a for a in ARCHITECTURES if a.model_class == type(stock).__name__), None)
        if arch is None:
            raise BrickworkError(f"no llama.cpp architecture here writes a {type(stock).__name__}")
        write_gguf_file(stock, tmp, arch(), tokenizer, dtype=dtype)

    def finish(self, tmp: Path, report, started: float) -> None:
        pass  # the file is the whole output

    def load(self, path: Path):
        from brickwork.io.gguf import gguf_architecture

        path = Path(path)
        name = gguf_architecture(path)
        arch = next((a for a in ARCHITECTURES if a.gguf_name == name), None)
        if arch is None:
            raise BrickworkError(
                f"{path} is a '{name}' GGUF file; brickwork reads back "
                f"{', '.join(a.gguf_name for a in ARCHITECTURES)}"
            )
        return arch().read_gguf(path)


def _is_brickwork_gguf(path: Path) -> bool:
    from brickwork.models.loading import open_gguf

    try:
        field = open_gguf(path).get_field("general.name")
    except BrickworkError:  # an unreadable file is not ours
        return False
    return field is not None and field.contents() == "brickwork export"
