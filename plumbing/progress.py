"""Progress of a stage: tqdm's bar on a terminal, plain lines in a log file, nothing on ranks other
than 0."""
import sys
import time

from tqdm import tqdm

from plumbing import distributed


class Lines:
    """Progress for a log file: a plain line every `every` seconds and at the end, where tqdm would
    redraw its bar with a carriage return on every update. Same calls as a tqdm bar."""

    def __init__(self, total, desc, initial=0, every=15.0):
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.start = self.last = time.time()
        self.postfix, self.shown = {}, initial

    def update(self, n=1):
        self.n += n
        if time.time() - self.last >= self.every or self.n == self.total:
            self.show()

    def set_postfix(self, figures=None, **more):
        self.postfix = {**(figures or {}), **more}

    def show(self):
        self.last, self.shown = time.time(), self.n
        figures = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} in {self.last - self.start:.0f} s{figures}", file=sys.stderr, flush=True)

    def close(self):
        if self.shown != self.n:
            self.show()


def progress(total, desc, initial=0):
    """A tqdm bar on a terminal; plain lines (Lines) when stderr goes to a file; nothing on ranks
    other than 0."""
    if not distributed.is_main():
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, dynamic_ncols=True, initial=initial)
    return Lines(total, desc, initial)
