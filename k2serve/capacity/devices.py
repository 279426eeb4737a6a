"""Accelerators the planner knows, by the memory their driver reports, and this host's RAM."""

from __future__ import annotations

import os
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


class DeviceError(ValueError):
    pass


@dataclass(frozen=True)
class Device:
    """name; memory_bytes: what the driver reports (nvidia-smi's total), before any utilisation cap."""

    name: str
    memory_bytes: int

    def __post_init__(self) -> None:
        if self.memory_bytes < 1:
            raise DeviceError(f"device {self.name!r}: memory_bytes must be >= 1, got {self.memory_bytes}")


# nvidia-smi totals: H100 SXM 80 GB (81,559 MiB), H200 141 GB (143,771 MiB), B200 192 GB (183,359 MiB).
GPUS = {
    "h100": Device("h100", 81_559 * MiB),
    "h200": Device("h200", 143_771 * MiB),
    "b200": Device("b200", 183_359 * MiB),
}


def host_ram_bytes() -> int:
    """Physical memory of this host (bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device(name: str) -> Device:
    """A GPU of GPUS by name, or "cpu": this host's RAM."""
    if name == "cpu":
        return Device("cpu", host_ram_bytes())
    if name not in GPUS:
        raise DeviceError(f"unknown device {name!r}: one of {sorted(GPUS) + ['cpu']}")
    return GPUS[name]
