"""What every benchmark records beside its numbers: the commit, the machine and the software."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import brickwork

# The instruction-set flags that change which kernels are fast (machines of one class have differed by day).
# The CarveConfig fields that name a carved configuration in benchmark results.
CONFIG_KEYS = (
    "experts",
    "shared",
    "active",
    "method",
    "router",
    "router_options",
    "down_fraction",
    "combine",
)

_SIMD_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
)


def machine_info() -> dict:
    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "commit": commit + ("-dirty" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cpu_flags": [flag for flag in _SIMD_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "brickwork": brickwork.__version__,
    }


def write_results(directory: Path, results: dict, table: str) -> None:
    from brickwork.io_utils import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "results.json", json.dumps(results, indent=2))
    atomic_write_text(directory / "results.md", table + "\n")
