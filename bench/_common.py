"""The bench scripts' shared helpers live in the package (``brickwork bench`` uses them too)."""

from brickwork.benchmarks.common import machine_info, write_results

__all__ = ["machine_info", "write_results"]
