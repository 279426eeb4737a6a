"""Test hosts on one machine: Linux network namespaces joined by a bridge, for multi-host tests.

`HostNetwork` makes one namespace per host plus a hub namespace holding a bridge; each host gets a veth
`eth0` on the bridge with its own address, so the hosts reach each other only through the bridge and
nothing touches the root namespace. Processes run in a host with `host.command(argv)`; this process's
own calls run in a host's namespace with `call_in`. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000  # <sched.h>; os.CLONE_NEWNET exists only from Python 3.12
NETNS_DIR = "/run/netns"
LINK = "eth0"  # every host's interface on the bridge


class NetnsError(RuntimeError):
    """An `ip` command failed: carries the command and what it printed."""

    def __init__(self, argv: Sequence[str], output: str) -> None:
        super().__init__(f"{' '.join(argv)} failed: {output.strip()}")
        self.argv = list(argv)
        self.output = output


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or NetnsError."""
    argv = ["ip", *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    if p.returncode != 0:
        raise NetnsError(argv, p.stderr or p.stdout)
    return p.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, a sandbox forbids it), or None."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"k2probe{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One test host: a namespace whose interface `eth0` has `address` (a /24 on the bridge)."""

    netns: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def set_link(self, up: bool) -> None:
        """Plug (up) or unplug (down) this host's cable: while down it reaches nothing and nobody reaches it."""
        ip("-n", self.netns, "link", "set", LINK, "up" if up else "down")


class HostNetwork:
    """Hosts `names` on one bridge, addressed `subnet`.1, .2, ... in order; namespaces are named
    `<prefix>-<name>` (prefix defaults to one unique to this process). `destroy` removes them all
    (their veths go with them) and is safe to call on a half-built network; it does not kill processes
    started in the hosts: stop those first, or a namespace lives on until its last process exits."""

    def __init__(self, names: Sequence[str], subnet: str = "10.231.0", prefix: str | None = None) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need distinct host names, got {list(names)}")
        if len(names) > 250:
            raise ValueError(f"at most 250 hosts on one /24, got {len(names)}")
        self.prefix = prefix or f"k2t{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.hosts = {n: Host(f"{self.prefix}-{n}", f"{subnet}.{i + 1}") for i, n in enumerate(names)}
        self._made: list[str] = []

    def create(self) -> HostNetwork:
        try:
            self._add_netns(self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts.values()):
                self._add_netns(host.netns)
                port = f"p{i}"  # the bridge end, in the hub
                ip(
                    "-n",
                    self.hub,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    LINK,
                    "netns",
                    host.netns,
                )
                ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
                ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", LINK)
                ip("-n", host.netns, "link", "set", LINK, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Delete every namespace this network made; raises NetnsError naming those left behind."""
        errors = []
        for name in reversed(self._made):
            try:
                ip("netns", "del", name)
            except (NetnsError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        self._made.clear()
        if errors:
            raise NetnsError(["ip", "netns", "del"], "; ".join(errors))

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> HostNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def call_in(host: Host, fn: Callable[..., T], *args: object, timeout: float | None = None) -> T:
    """fn(*args) on a fresh thread that has entered `host`'s namespace (sockets it opens live there);
    its result or its exception. The calling thread stays where it is."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(f"{NETNS_DIR}/{host.netns}", os.O_RDONLY)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {host.netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            out["error"] = e

    t = threading.Thread(target=run, name=f"in-{host.netns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {host.netns} still running after {timeout} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
