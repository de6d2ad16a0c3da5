"""Progress of a transfer (staging up, gathering or fetching down), drawn by tqdm.

One callback for both places a transfer shows: a terminal (``stage``, ``fetch``: a live
bar on stderr) and a protocol's log (a line every :data:`LOG_EVERY` seconds, through the
step's logger). tqdm's ``mininterval`` is the one throttle of both.

The stagers call it as ``progress(bytes_done, bytes_total, files_done, files)``.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

from tqdm import tqdm

LOG_EVERY = 10.0  #: seconds between progress lines in a protocol's log
TERMINAL_EVERY = 0.25  #: seconds between redraws of a terminal's bar


class _LineWriter:
    """A file for tqdm that hands each drawn status to *say* as one line."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def write(self, text: str) -> None:
        text = text.strip("\r\n\x1b[A ")
        if text:
            self.say(text)

    def flush(self) -> None:
        pass


class TransferProgress:
    """A staging progress callback shown with tqdm.

    Args:
        label: what moves where, e.g. "staging to hpc".
        say: send each line to this (a protocol's log); None: a live bar on *stream*.
        stream: the terminal (default stderr).
        every: seconds between two lines or redraws (default :data:`LOG_EVERY` with *say*,
            :data:`TERMINAL_EVERY` on a terminal).
    """

    def __init__(self, label: str, say: Optional[Callable[[str], None]] = None,
                 stream: Optional[TextIO] = None, every: Optional[float] = None):
        self.label = label
        self.to_log = say is not None
        self._file = _LineWriter(say) if say is not None else (stream or sys.stderr)
        self._every = every if every is not None else LOG_EVERY if self.to_log \
            else TERMINAL_EVERY
        self.bar: Optional[tqdm] = None

    def _make(self, total: int) -> tqdm:
        return tqdm(total=total, desc=self.label, unit="B", unit_scale=True,
                    unit_divisor=1000, file=self._file, mininterval=self._every,
                    miniters=1, leave=not self.to_log, ascii=self.to_log or None,
                    ncols=100 if self.to_log else None, dynamic_ncols=not self.to_log,
                    delay=self._every if self.to_log else 0,
                    bar_format="{desc}: {percentage:3.0f}% {n_fmt}B / {total_fmt}B{postfix}, "
                               "{rate_fmt}, {remaining} left" if self.to_log else None)

    def __call__(self, done: int, total: int, files_done: int, files: int) -> None:
        if self.bar is None:
            self.bar = self._make(total)
        bar = self.bar
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str("file %d of %d" % (min(files_done + 1, files), files),
                            refresh=False)
        bar.update(done - bar.n)

    def end(self) -> None:
        """Close the bar (a terminal keeps its last state on its own line)."""
        if self.bar is not None:
            if self.to_log:
                self.bar.leave = False
            self.bar.close()
            self.bar = None


def for_terminal(label: str) -> TransferProgress:
    """The command line's progress: a live bar when stderr is a terminal, else (a log, a
    pipe) a plain line every :data:`LOG_EVERY` seconds."""
    if sys.stderr.isatty():
        return TransferProgress(label)
    return TransferProgress(label, say=lambda line: (sys.stderr.write(line + "\n"),
                                                    sys.stderr.flush()) and None)
