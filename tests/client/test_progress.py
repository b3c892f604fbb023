"""Progress bars: rate and ETA, the built-in bar without tqdm, periodic lines off a terminal."""

from __future__ import annotations

import io
import sys

import pytest

from balpm import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_shows_count_percentage_rate_and_eta() -> None:
    b = progress.Bar(200, "upload", "item", stream=io.StringIO())
    b._start -= 10.0  # 10 s ago
    b.n = 50
    line = b.line()
    assert "upload" in line and " 25% " in line and "50/200 item" in line
    assert "5.0 item/s" in line and "[00:10<00:30," in line  # 150 left at 5/s


def test_without_tqdm_a_terminal_gets_the_builtin_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.delenv("BALPM_PROGRESS", raising=False)
    stream = _Tty()
    with progress.bar(3, "train", "epoch", stream=stream) as b:
        assert isinstance(b, progress.TextBar)
        for _ in range(3):
            b.update()
    text = stream.getvalue()
    assert "\r" in text and "3/3 epoch" in text and text.endswith("\n")


def test_off_a_terminal_lines_are_periodic_and_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    with progress.bar(1000, "featurise", "item", stream=stream) as b:
        for n in range(0, 1001, 100):
            b.set(n)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("featurise 100%")  # the first update, then the end
    quiet = io.StringIO()
    with progress.bar(10, "x", stream=quiet, enabled=False) as b:
        b.update(10)
    monkeypatch.setenv("BALPM_PROGRESS", "0")
    with progress.bar(10, "y", stream=quiet) as b:
        b.update(10)
    assert quiet.getvalue() == ""
