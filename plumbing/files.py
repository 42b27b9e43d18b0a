"""Files: the user-error base every one-line error derives from, and the writers and readers of
run folders (JSON, text, JSON lines). A write is atomic and rank 0's alone (plumbing/distributed.py)."""
import json
import os
import re

from plumbing import distributed


class UserError(ValueError):
    """A user's mistake (a file, a folder, a setting, a run folder in use): train.py prints the
    message on one line and exits with status 2. Every such error of the project derives from it."""


class DataError(UserError):
    """A mistake in a user's file: the message names the file, the line and the field."""


def atomic_write(path, write):
    """write(tmp) to a temporary name, then rename into place: a kill leaves the old file or the
    new one, never half of one. Rank 0 alone writes (plumbing/distributed.py): every writer comes here."""
    if not distributed.is_main():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def temporary(name):
    """Whether a file name is one of atomic_write's temporary names: a write that a kill cut short."""
    return re.search(r"\.tmp\d+$", name) is not None


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def read_json(path):
    """A JSON file, with or without a byte-order mark; a missing file or bad JSON raises DataError
    naming the file and the line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno})") from None


def append_jsonl(path, row):
    if not distributed.is_main():
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path, key, below):
    """Keep the rows of a metrics file whose `key` is below `below` (the steps before a resume). A
    last line without its newline is one a kill cut short: it goes too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.endswith("\n") and line.strip() and json.loads(line)[key] < below]
    write_text(path, "".join(rows))
