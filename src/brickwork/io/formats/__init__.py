"""The stock export formats, one file each, and their registry.

``EXPORT_FORMATS`` maps each format's name to its class (:class:`~brickwork.io.formats.base.StockFormat`); the
order is the order refusals list the formats that would fit. A new format is one file plus one line here.
"""

from __future__ import annotations

from pathlib import Path

from brickwork.errors import BrickworkError
from brickwork.io.formats.base import ExportPlan, StockFormat
from brickwork.io.formats.deepseek_v3 import DeepseekV3
from brickwork.io.formats.gguf import Gguf
from brickwork.io.formats.glm4_moe import Glm4Moe
from brickwork.io.formats.mixtral import Mixtral
from brickwork.io.formats.qwen2_moe import Qwen2Moe
from brickwork.io.formats.qwen3_moe import Qwen3Moe

EXPORT_FORMATS: dict[str, type[StockFormat]] = {
    cls.name: cls for cls in (Qwen2Moe, Mixtral, Glm4Moe, Qwen3Moe, Gguf, DeepseekV3)
}
DEFAULT_FORMAT = Qwen2Moe.name


def get_format(name: str | StockFormat) -> StockFormat:
    """The format called ``name`` (BrickworkError naming the choices when there is none)."""
    if isinstance(name, StockFormat):
        return name
    if name not in EXPORT_FORMATS:
        raise BrickworkError(f"unknown export format '{name}'; choose from {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]()


def format_for_rule(rule: str) -> str:
    """The stock format that computes combine ``rule`` (sigmoid: GLM-4.5's gate), else the default format."""
    return next((n for n, cls in EXPORT_FORMATS.items() if rule in cls.default_for_rules), DEFAULT_FORMAT)


def default_format(out: str | Path, rules: set[str]) -> str:
    """The format ``export`` writes when none is named: the file format whose suffix ``out`` has, else the one that
    computes the carve's combine rule (``rules``: those of its layers; none or several: the default)."""
    suffix = Path(out).suffix
    for name, cls in EXPORT_FORMATS.items():
        if cls.suffix is not None and cls.suffix == suffix:
            return name
    return format_for_rule(next(iter(rules))) if len(rules) == 1 else DEFAULT_FORMAT


__all__ = [
    "DEFAULT_FORMAT",
    "EXPORT_FORMATS",
    "ExportPlan",
    "StockFormat",
    "default_format",
    "format_for_rule",
    "get_format",
]
