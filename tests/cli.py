"""train.py's command line run inside the test process: train.main(argv), its printed output and
its exit status caught as subprocess.run gives them. A new interpreter spends about 4 s on imports
before any work (torch, then torch._dynamo, which the first optimizer imports), a micro run's
whole length; the suite runs dozens of them. Each run starts from the same state a process would:
the flags travel in the run's settings (train.main sets no module's globals), and each stage seeds
the global random stream from its name and settings (plumbing/runs.py).

Tests of what only a real process shows (a kill and a resume, torchrun's ranks, the exit status and
the one line a shell sees) start one."""
import contextlib
import io
import os
import subprocess
import sys

import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, cwd=ROOT):
    """train.py *args, run in cwd -> subprocess.CompletedProcess(args, returncode, stdout, stderr).
    What main sets for the process (the matmul precision) is set back after it, as a process's would
    end with it."""
    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    here, precision = os.getcwd(), torch.get_float32_matmul_precision()
    os.chdir(cwd)  # (contextlib.chdir needs Python 3.11)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            train.main(argv)
    except SystemExit as e:  # a user's mistake (2), a non-finite loss (3), argparse's usage (2)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(here)
        torch.set_float32_matmul_precision(precision)
    return subprocess.CompletedProcess(["train.py", *argv], code, stdout.getvalue(), stderr.getvalue())


def run_process(*args, cwd=ROOT):
    """train.py *args in a process of its own: what a shell sees (its exit status, every line it writes)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
