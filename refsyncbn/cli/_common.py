"""Helpers of the subcommands: argument types and progress on stderr."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["Progress", "int_at_least", "one_line", "positive_int"]

# Errors about the user's input (files, arguments, cases): their message is enough.
USER_ERRORS = (ValueError, TypeError, OSError)


def int_at_least(low: int):
    """argparse type: an int >= ``low``.

    Examples
    --------
    >>> int_at_least(1)("4")
    4
    >>> int_at_least(1)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an int >= 1, got '0'
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            msg = f"expected an int >= {low}, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = int_at_least(1)


class Progress:
    """``total`` steps: a tqdm bar when tqdm imports, else a plain line per tenth.

    Writes to stderr, so stdout keeps only the command's result; ``enabled``
    false (e.g. on ranks other than 0) shows nothing.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> with Progress(3, "demo", "case", stream=out, use_tqdm=False) as bar:
    ...     for _ in range(3):
    ...         bar.update()
    >>> [line.split(" (")[0] for line in out.getvalue().splitlines()]
    ['demo: 1/3 cases', 'demo: 2/3 cases', 'demo: 3/3 cases']
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        enabled: bool = True,
        stream=None,
        use_tqdm: bool = True,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.done, self.start, self._next = 0, time.perf_counter(), 0
        self._bar = None
        self.enabled = enabled
        if enabled and use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream)

    def update(self) -> None:
        """One more step done."""
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update()
        elif self.done >= self._next or self.done == self.total:
            # A line per tenth of the work (every step when there are at most 10).
            self._next = self.done + max(1, self.total // 10)
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}s "
                f"({time.perf_counter() - self.start:.1f} s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its message (with its type when it is not a usage error).

    A :class:`~refsyncbn.comm.RankError` (several simulated ranks failed) gives
    each distinct cause once, without the peers that only stopped waiting.

    Examples
    --------
    >>> one_line(ValueError("x has shape (2,);\\n expected 2-D"))
    'x has shape (2,); expected 2-D'
    >>> one_line(FileExistsError(17, "File exists", "out"))
    'out: File exists'
    >>> one_line(KeyError("y"))
    "KeyError: 'y' (an internal error: please report it; --debug shows the traceback)"
    """
    from ..comm.simulated import PeerAborted, RankError

    if isinstance(exc, RankError):
        causes = [e for e in exc.errors.values() if not isinstance(e, PeerAborted)]
        texts = list(dict.fromkeys(one_line(e) for e in causes or exc.errors.values()))
        return "; ".join(texts)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split())
    if isinstance(exc, USER_ERRORS):
        return text
    return (
        f"{type(exc).__name__}: {text} (an internal error: please report it; --debug "
        f"shows the traceback)"
    )
