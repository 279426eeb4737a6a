"""A reader of the safetensors format that reads each tensor straight into its destination.

The format: 8 bytes little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}}, plus optional "__metadata__"), then the data. Reading with `readinto`
instead of memory-mapping keeps the file's pages out of this process's resident memory, so loading
peaks near the model's own size whatever the shard size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(ValueError):
    """The file is not valid safetensors; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


class SafetensorsReader:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        raw = self._f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{self.path}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{self.path}: header of {n} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not JSON ({e})") from e
        size = self.path.stat().st_size
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in DTYPES:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
                )
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for d in shape:
                numel *= d
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - begin != numel * itemsize or 8 + n + end > size or begin < 0:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has inconsistent offsets {begin}..{end}"
                )
            self.entries[name] = Entry(dtype, shape, 8 + n + begin, end - begin)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor `name` into `out`, which must be contiguous with the same dtype and numel.

        `out` on another device than the CPU (a CUDA parameter): the file's bytes are read into a host
        buffer of this one tensor (pinned when `out` is on CUDA) and copied over, so a checkpoint never
        has more than one tensor in host memory at a time."""
        e = self.entries[name]
        if not out.is_contiguous() or out.dtype != e.dtype or out.numel() * out.element_size() != e.nbytes:
            raise SafetensorsError(
                f"{self.path}: cannot read {name!r} into a {out.dtype} {tuple(out.shape)} view"
            )
        if out.device.type != "cpu":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=out.is_cuda)
            self.read_into(name, host)
            out.copy_(host, non_blocking=out.is_cuda)
            return
        self._f.seek(e.begin)
        buf = out.view(torch.uint8).reshape(-1).numpy().data if e.nbytes else memoryview(b"")
        got = self._f.readinto(buf) if e.nbytes else 0
        if got != e.nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name!r} truncated ({got} of {e.nbytes} bytes)")

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.dtype)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        self._f.close()
