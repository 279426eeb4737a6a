"""Progress of a run on stderr: one updating line on a terminal, a line every interval otherwise."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO


class Progress:
    """Counts what the run loop reports; `show()` writes the state, which `ticker()` does every
    `interval_s` (default 0.5 s on a terminal, 10 s otherwise) until cancelled, so a stalled run still
    reports. `total`: requests to send at most (None: bounded by time only)."""

    def __init__(
        self,
        total: int | None,
        duration_s: float | None,
        stream: TextIO | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.tty else 10.0)
        self.total = total
        self.duration_s = duration_s
        self.sent = self.done = self.failed = self.rejected = self.output_tokens = 0
        self._t0 = time.perf_counter()

    def on_sent(self) -> None:
        self.sent += 1

    def on_done(self, ok: bool, rejected: bool, output_tokens: int) -> None:
        self.done += 1
        self.failed += not ok and not rejected
        self.rejected += rejected
        self.output_tokens += output_tokens

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.show()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        total = f"/{self.total}" if self.total is not None else ""
        limit = f"/{self.duration_s:g}" if self.duration_s is not None else ""
        rate = self.output_tokens / elapsed if elapsed > 0 else 0.0
        return (
            f"[bench serve {elapsed:7.1f}{limit} s] sent {self.sent}{total}  done {self.done}  "
            f"in flight {self.sent - self.done}  failed {self.failed}  rejected {self.rejected}  "
            f"output {rate:.1f} tok/s"
        )

    def show(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The final state, ending the updating line."""
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line() + "\n")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
