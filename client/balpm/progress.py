"""Progress bars with rate and ETA for the CLI and the simulation (tqdm when installed, else built in).

`bar(total, desc, unit)` returns a `Bar`. On a terminal it redraws one line in place (tqdm's if tqdm
is importable, else `TextBar`'s); elsewhere (a log file, CI) it prints a plain line at most every
`LOG_EVERY_S` seconds and at the end, so long jobs stay visible without flooding the log. tqdm is
optional: nothing here needs it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

LOG_EVERY_S = 10.0
_REDRAW_S = 0.1
_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Bar:
    """A progress bar: `update(n)` adds, `set(n)` moves to an absolute count, `write` prints above it.

    Args:
        total: Expected count (None or 0: unknown, no percentage or ETA).
        desc: Label.
        unit: Unit of the count ("item", "epoch", "round").
        stream: Where to draw (stderr by default).
        enabled: False draws nothing.
    """

    def __init__(
        self, total: int | None, desc: str, unit: str = "it", *, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.total = total or None
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix = ""
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn: tuple[int, int | None, str] | None = None  # what the last line showed
        self._closed = False

    # ---- counting --------------------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        """Add `n` to the count."""
        self.set(self.n + n)

    def set(self, n: int, total: int | None = None) -> None:
        """Move to the count `n` (and change the total, when given)."""
        if total is not None:
            self.total = total or None
        self.n = n
        self._refresh(final=False)

    def set_postfix(self, text: str) -> None:
        """Text shown after the rate, e.g. the latest loss."""
        self.postfix = text
        self._refresh(final=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Draw the final state once."""
        if not self._closed:
            self._closed = True
            self._refresh(final=True)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- drawing ---------------------------------------------------------------------------

    def line(self) -> str:
        """The bar as text: `desc 40% |#####     | 400/1000 item [00:04<00:06, 100.0 item/s] postfix`."""
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [self.desc]
        if self.total:
            frac = min(1.0, self.n / self.total)
            fill = int(frac * _WIDTH)
            parts.append(f"{frac * 100:3.0f}% |{'#' * fill}{' ' * (_WIDTH - fill)}| {self.n}/{self.total} {self.unit}")
            eta = (self.total - self.n) / rate if rate > 0 and self.n < self.total else 0.0
            parts.append(f"[{_duration(elapsed)}<{_duration(eta)}, {rate:.1f} {self.unit}/s]")
        else:
            parts.append(f"{self.n} {self.unit} [{_duration(elapsed)}, {rate:.1f} {self.unit}/s]")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(parts)

    def _refresh(self, *, final: bool) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last_draw < self._interval():
            return
        state = (self.n, self.total, self.postfix)
        if final and (state == self._drawn or (self._drawn is None and not self.n)):
            return  # nothing new since the last line, or nothing happened
        self._last_draw, self._drawn = now, state
        self._draw(final=final)

    def _interval(self) -> float:
        return LOG_EVERY_S

    def _draw(self, *, final: bool) -> None:
        print(self.line(), file=self.stream, flush=True)


class TextBar(Bar):
    """The built-in terminal bar: one line redrawn in place."""

    def _interval(self) -> float:
        return _REDRAW_S

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.enabled:
                self._draw(final=True)  # always end the line in place

    def _draw(self, *, final: bool) -> None:
        self.stream.write("\r\x1b[K" + self.line() + ("\n" if final else ""))
        self.stream.flush()

    def write(self, message: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + message + "\n")
            self._draw(final=False)


class TqdmBar(Bar):
    """A `Bar` drawn by tqdm."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> None:
        from tqdm import tqdm

        super().__init__(total, desc, unit, **kwargs)
        self._tqdm = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, disable=not self.enabled)

    def set(self, n: int, total: int | None = None) -> None:
        if total is not None and (total or None) != self._tqdm.total:
            self._tqdm.total = total or None
            self._tqdm.refresh()
        if self.postfix and self.postfix != self._tqdm.postfix:
            self._tqdm.set_postfix_str(self.postfix, refresh=False)
        self._tqdm.update(n - self._tqdm.n)
        self.n = n

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        self._tqdm.set_postfix_str(text)

    def write(self, message: str) -> None:
        if self.enabled:
            self._tqdm.write(message, file=self.stream)

    def close(self) -> None:
        self._tqdm.close()


def enabled_by_env() -> bool:
    """False when BALPM_PROGRESS=0 (or "no", "off", "false")."""
    return os.environ.get("BALPM_PROGRESS", "").strip().lower() not in ("0", "no", "off", "false")


def bar(
    total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, stream: TextIO | None = None
) -> Bar:
    """A progress bar on `stream` (stderr): tqdm or `TextBar` on a terminal, periodic lines elsewhere."""
    stream = stream or sys.stderr
    enabled = enabled and enabled_by_env()
    if not (enabled and stream.isatty()):
        return Bar(total, desc, unit, stream=stream, enabled=enabled)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return TextBar(total, desc, unit, stream=stream)
    return TqdmBar(total, desc, unit, stream=stream)


__all__ = ["Bar", "TextBar", "TqdmBar", "bar", "enabled_by_env"]
