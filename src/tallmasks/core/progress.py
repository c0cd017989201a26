"""Progress bars that read well in a terminal and in a log.

On a terminal, :func:`progress` is tqdm's bar. When its stream is not a terminal (output piped to a file,
CI, ``make demo | tee log``) it writes plain lines instead, with no carriage return and no cursor-control sequence (nested bars would
otherwise move the cursor up with ESC[A): a kept bar (``leave=True``, tqdm's default) writes a line when it
starts, at most one every ``PLAIN_INTERVAL_S`` seconds, and one when it ends; a transient bar
(``leave=False``) writes only if it runs longer than one interval, then the same.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.std import tqdm

#: seconds between two plain progress lines when the output is not a terminal
PLAIN_INTERVAL_S = float(os.environ.get("TALLMASKS_PROGRESS_INTERVAL_S", "30"))

PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (``TALLMASKS_PLAIN_PROGRESS=1`` says no)."""
    if os.environ.get("TALLMASKS_PLAIN_PROGRESS", "") not in ("", "0"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class Progress(tqdm):
    """tqdm, degraded to plain lines when its stream is not a terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        stream = kwargs.get("file") or sys.stderr
        self._plain = not is_terminal(stream)
        self._ended = False
        self._last_line: float | None = None
        self._printed_final = False
        self._printed_any = False
        self._keeps_lines = kwargs.get("leave", True) is not False
        if self._plain:
            kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0), PLAIN_INTERVAL_S)
            kwargs["maxinterval"] = max(float(kwargs.get("maxinterval") or 0), PLAIN_INTERVAL_S)
            kwargs.pop("dynamic_ncols", None)
            kwargs["ascii"] = True
            kwargs["position"] = 0  # never move the cursor to another row
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._plain:
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing its row: nothing to clear in a log
            return False
        if msg is None:
            now = self._time()
            final = self._ended or (self.total is not None and self.n >= self.total)
            if self._last_line is None and not self._keeps_lines:
                self._last_line = now  # a transient bar shows itself only if it runs past one interval
                return False
            if final:
                if self._printed_final or not (self._keeps_lines or self._printed_any):
                    return False
            elif self._last_line is not None and now - self._last_line < PLAIN_INTERVAL_S:
                return False  # set_postfix and friends refresh often: one line per interval in a log
            self._last_line = now
            self._printed_final = final
            self._printed_any = True
            fmt = PLAIN_FORMAT if self.total else PLAIN_FORMAT_NO_TOTAL
            msg = self.format_meter(**{**self.format_dict, "bar_format": fmt, "ncols": None})
        self.fp.write(msg.strip() + "\n")
        self.fp.flush()
        return False

    def close(self) -> None:
        if self._plain and not self.disable and not self._ended:
            self._ended = True
            self.leave = False  # the final line below is the summary; tqdm must not repeat it
            self.display()
        super().close()


def progress(*args: Any, **kwargs: Any) -> Progress:
    """A progress bar over an iterable (tqdm's arguments), plain lines when not on a terminal."""
    return Progress(*args, **kwargs)
