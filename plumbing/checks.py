"""Every setting checked before any work. Each field of a config dataclass is declared by setting(),
with its help and what it may hold; add_flags makes a flag of each (train.py). problem() checks one value
against its field; train.check walks every field with settings() and then the settings that
contradict each other. tests/test_errors.py fails on a field that declares nothing.
"""
import argparse
import dataclasses
import math
import os

import torch


def setting(default, help, range=None, **what):
    """A field of a config dataclass, and so a flag (train.py): its default, its help line, and what
    problem() accepts. range: an interval such as "[1, inf)" or "(0, 1]" ([ and ] include the end,
    ( and ) do not; for a comma list of numbers, each), with why="..." when a bound needs a reason;
    or kind="...", a path or a list of names (KINDS); or choices=[...]. A bool is a switch: none.

        lr: float = setting(3e-4, "peak learning rate", range="(0, inf)")
    """
    return dataclasses.field(default=default, metadata={"help": help, **({"range": range} if range else {}), **what})


def flag(stage, name):
    """A setting's flag: --ppo-kl-coef for the ppo stage's kl_coef; the run's own fields (stage "")
    and the split's have no prefix (--seed, --delta)."""
    return "--" + ("" if stage in ("", "split") else stage + "-") + name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """Flag mistakes: one line on stderr and exit status 2, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_flags(parser, cls, prefix, title, preset_fields=()):
    """One flag per field of a config dataclass; None means "not given": the preset's value stays.
    preset_fields: the run's fields a preset sets, whose help says so."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default is dataclasses.MISSING else f.default):
            continue  # a stage's config: its own group
        flag = "--" + prefix + f.name.replace("_", "-")
        shown = "" if f.default is False or f.default == "" else f" (default: {f.default})"
        if f.name in preset_fields or prefix:
            shown = f" (default: {f.default}, or the preset's)"
        kw = dict(dest=prefix.replace("-", "_") + f.name, default=None, help=f.metadata["help"] + shown)
        if f.type in (bool, "bool"):
            group.add_argument(flag, action="store_const", const=True, **kw)
        else:
            group.add_argument(flag, type=type(f.default), choices=f.metadata.get("choices"), **kw)


def settings(run):
    """(flag, value, metadata) of every field of the run and of its stage configs."""
    for f in dataclasses.fields(run):
        if not dataclasses.is_dataclass(getattr(run, f.name)):  # a stage's config: below
            yield flag("", f.name), getattr(run, f.name), f.metadata
    for name, cfg in run.stage_configs().items():
        for f in dataclasses.fields(cfg):
            yield flag(name, f.name), getattr(cfg, f.name), f.metadata


def in_range(x, interval):
    """x in "[lo, hi)", "(0, inf)", ...: a bracket includes its end, a parenthesis does not."""
    lo, hi = (float(end) for end in interval[1:-1].split(","))
    return (lo <= x if interval[0] == "[" else lo < x) and (x <= hi if interval[-1] == "]" else x < hi)


def needs(interval):
    """An interval in words: "1 or more", "more than 0", "a number in [0, 1)"."""
    lo, hi = (end.strip() for end in interval[1:-1].split(","))
    if hi != "inf":
        return f"a number in {interval}"
    return "a finite number" if lo == "-inf" else f"{lo} or more" if interval[0] == "[" else f"more than {lo}"


def unknown(value, allowed, what):
    bad = [x for x in value.split(",") if x and x not in allowed]
    return f"unknown {what} {bad[0]!r}: choose from {','.join(allowed)}" if bad else None


def file_problem(path):
    if path and not os.path.isfile(path):
        return "is a folder, not a file" if os.path.isdir(path) else "no such file"


def folder_problem(path):
    if path and not os.path.isdir(path):
        return "is a file, not a folder" if os.path.exists(path) else "no such folder"


def run_folder_problem(path):
    """A folder, or a path where one can be made: its nearest existing part is a writable folder."""
    if not path:
        return "needs a folder"
    there = os.path.abspath(path)
    while not os.path.exists(there):
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        return "is a file, not a folder" if there == os.path.abspath(path) else f"{there} is a file, not a folder"
    if not os.access(there, os.W_OK | os.X_OK):
        return f"{there} is not writable"


def device_problem(device):
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        return "choose cpu, cuda or cuda:N"
    n = torch.cuda.device_count()
    if kind == "cuda" and (torch.device(device).index or 0) >= n:
        return f"only {n} CUDA devices here" if n else "no CUDA device here"


KINDS = {  # a kind -> what is wrong with a value of it, or None (train.KINDS adds the names of this project's lists)
    "device": device_problem,
    "file": file_problem,
    "folder": folder_problem,
    "run folder": run_folder_problem,
    "chat template": lambda v: None if v in ("auto", "none") else file_problem(v) if v else "choose auto, none or a file",
}


def problem(value, meta, kinds=KINDS):
    """What is wrong with one setting, by its field's metadata, or None."""
    if isinstance(value, bool):
        return None
    if "choices" in meta:
        return None if value in meta["choices"] else f"choose from {', '.join(meta['choices'])}"
    if meta.get("kind") == "numbers":
        for item in (x for x in value.split(",") if x):
            try:
                x = float(item)
            except ValueError:
                return f"{item!r} is not a number"
            if not math.isfinite(x):
                return f"{item} is not a finite number"
            if not in_range(x, meta["range"]):
                return f"each needs {needs(meta['range'])}, not {item}"
        return None
    if "kind" in meta:
        return kinds[meta["kind"]](value)
    if not math.isfinite(value):
        return "not a finite number"
    if not in_range(value, meta["range"]):
        return f"needs {needs(meta['range'])}" + (f" ({meta['why']})" if "why" in meta else "")
    return None
