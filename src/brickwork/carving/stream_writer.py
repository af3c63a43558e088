"""Writing one safetensors file tensor by tensor, so that a model larger than memory can be saved as it is made.

safetensors is an 8-byte little-endian header length N, a JSON header of N bytes (each tensor's dtype, shape and
byte range in the data that follows), then the tensors' bytes back to back. Names and shapes are known only as the
tensors arrive, so :class:`SafetensorsStreamWriter` leaves ``reserve`` bytes for the header, appends each tensor's
bytes as it comes, and at :meth:`close` writes the header into the reserved space, padded with spaces (JSON allows
trailing whitespace; the safetensors writer itself pads with spaces). A header that outgrows the reserve is written
to a new file followed by a copy of the data (a chunked copy: memory stays flat). ``safetensors.safe_open`` and
``load_file`` read the result.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from brickwork.errors import BrickworkError

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ALIGN = 8  # the data starts 8-byte aligned, as the safetensors writer makes it


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class SafetensorsStreamWriter:
    """Append tensors to ``path`` one at a time; :meth:`close` writes the header. Use as a context manager (an
    error removes the partial file)::

        with SafetensorsStreamWriter(path, metadata={"format": "..."}) as writer:
            writer.add("a.weight", tensor)
    """

    def __init__(
        self, path: str | os.PathLike, metadata: dict[str, str] | None = None, reserve: int = 1 << 20
    ):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.reserve = _aligned(max(reserve, _ALIGN))
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.seek(8 + self.reserve)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            self.path.unlink(missing_ok=True)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; a contiguous CPU copy is written)."""
        if name in self.entries:
            raise BrickworkError(f"tensor {name} is written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise BrickworkError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        self._file.write(raw.numpy().data)
        size = raw.numel()
        self.entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + size],
        }
        self.offset += size

    def close(self) -> None:
        header = {"__metadata__": self.metadata, **self.entries} if self.metadata else dict(self.entries)
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) <= self.reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self.reserve) + text + b" " * (self.reserve - len(text)))
            self._file.close()
            return
        # the header outgrew its reserve: a new file with the header, then the data copied after it
        self._file.close()
        padded = _aligned(len(text))
        moved = self.path.with_name(self.path.name + ".data")
        os.replace(self.path, moved)
        try:
            with open(moved, "rb") as source, open(self.path, "wb") as target:
                target.write(struct.pack("<Q", padded) + text + b" " * (padded - len(text)))
                source.seek(8 + self.reserve)
                shutil.copyfileobj(source, target, 16 << 20)
        finally:
            moved.unlink(missing_ok=True)
