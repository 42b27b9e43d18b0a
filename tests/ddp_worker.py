"""train.py's entry point, under torchrun, watched: every file a rank writes, renames or deletes
inside the run folder is listed in RUN/../written-by-rank-R.json, and its process id is in
RUN/../pid-rank-R (both outside the run folder)."""
import atexit
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
seen = []


def watch(event, args):
    if event == "open":  # open(path, mode) or os.open(path, flags)
        path, mode, flags = args
        paths = [path] if (mode and any(c in mode for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR)) else []
    elif event in ("os.rename", "os.remove", "os.link"):  # renamed into place, deleted, linked
        paths = args[:2] if event != "os.remove" else args[:1]
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes)) and os.path.abspath(os.fsdecode(p)).startswith(out + os.sep):
            seen.append(f"{event} {os.path.relpath(os.fsdecode(p), out)}")


rank = os.environ.get("RANK", "0")
with open(os.path.join(os.path.dirname(out), f"pid-rank-{rank}"), "w") as f:
    f.write(str(os.getpid()))
sys.addaudithook(watch)
report = os.path.join(os.path.dirname(out), f"written-by-rank-{rank}.json")
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(set(seen)))))
train.main(sys.argv[1:])
