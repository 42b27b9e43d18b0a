"""train.py's command line, or another python3 command, run inside the test process: train.main(argv)
or the module, its printed output and its exit status caught as subprocess.run gives them. A new
interpreter spends about 4 s on imports before any work (torch, then torch._dynamo, which the first
optimizer imports), a micro run's whole length; the suite runs dozens of them. Each run starts from
the same state a process would: the flags travel in the run's settings (train.main sets no module's
globals), and each stage seeds the global random stream from its name and settings (plumbing/runs.py).

Tests of what only a real process shows (a kill and a resume, torchrun's ranks, the exit status and
the one line a shell sees) start one."""
import contextlib
import io
import os
import runpy
import subprocess
import sys
import warnings

import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, cwd=ROOT):
    """train.py *args, run in cwd -> subprocess.CompletedProcess(args, returncode, stdout, stderr)."""
    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = in_this_process(lambda: train.main(argv), stdout, stderr, cwd)
    return subprocess.CompletedProcess(["train.py", *argv], code, stdout.getvalue(), stderr.getvalue())


def run_python(argv, out, cwd=ROOT):
    """`python3 ARGV` (-m module, -c code or a script, then its arguments) run in this process, as a
    process of its own would run it in cwd, its output written to the open file out -> exit status."""
    def run():
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            with warnings.catch_warnings():  # the module imported already, by a test: run as __main__ all the same
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    return in_this_process(run, out, out, cwd)


def in_this_process(run, stdout, stderr, cwd):
    """run() in cwd, its output caught -> its exit status, as a process would end. What a process
    would end with (its working folder, its arguments, the matmul precision main sets) is set back."""
    here, argv, precision = os.getcwd(), sys.argv, torch.get_float32_matmul_precision()
    os.chdir(cwd)  # (contextlib.chdir needs Python 3.11)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run()
    except SystemExit as e:  # a user's mistake (2), a non-finite loss (3), argparse's usage (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(here)
        sys.argv = argv
        torch.set_float32_matmul_precision(precision)
    return 0


def run_process(*args, cwd=ROOT):
    """train.py *args in a process of its own: what a shell sees (its exit status, every line it writes)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
