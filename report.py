"""What a run shows a reader: the gap histogram, training curves, the results table and the
mean and spread over seeds. Pictures need matplotlib, which is optional: without it, text only."""
import json
import os
import statistics

import torch


def text_histogram(gaps, delta, bins=16, width=40):
    """The gap histogram as text, with the bin that holds delta marked."""
    lo, hi = gaps.min().item(), gaps.max().item()
    counts = torch.histc(gaps.float(), bins, lo, hi).long().tolist()
    step = (hi - lo) / bins or 1.0
    lines = [f"reward gaps of {len(gaps)} pairs (delta = {delta:.3g}: easy > delta >= hard)"]
    for i, c in enumerate(counts):
        left = lo + i * step
        mark = " <- delta" if left <= delta < left + step else ""
        lines.append(f"{left:8.2f} | {'#' * round(width * c / max(counts))} {c}{mark}")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot without a display, or None: pictures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_histogram(gaps, delta, path):
    """A PNG of the gap histogram with delta marked, when matplotlib is installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps.numpy(), bins=40, color="#4c72b0")
    ax.axvline(delta, color="#c44e52", label=f"delta = {delta:.2f}")
    ax.set(xlabel="reward gap r(x, y_w) - r(x, y_l)", ylabel="pairs", title="hard | easy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_curves(metrics_path, x, keys, path, versus=None):
    """A PNG with one panel per metric of a metrics.jsonl file (PPO score and KL, DPO margin),
    skipping metrics no row has; versus=(x, [y, ...]) adds a panel of y against x (PPO's reward
    against its KL, one point per iteration). False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [json.loads(line) for line in open(metrics_path)]
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys) + bool(versus), figsize=(4 * (len(keys) + bool(versus)), 3))
    for ax, key in zip(axes, keys):
        points = [(r[x], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), color="#4c72b0", marker="." if len(points) < 20 else None)
        ax.set(xlabel=x, title=key)
    if versus:
        vx, ys = versus
        for y, color in zip([y for y in ys if any(y in r for r in rows)], ("#4c72b0", "#c44e52")):
            axes[-1].plot([r[vx] for r in rows if y in r], [r[y] for r in rows if y in r], ".-", color=color, label=y)
        axes[-1].set(xlabel=vx, title=f"{' and '.join(ys)} against {vx}")
        axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- the results table

COLUMNS = [("gold_reward", "gold reward", "{:+.3f}"), ("well_formed", "well formed", "{:.2f}"),
           ("rm_score", "RM score", "{:+.3f}"), ("win_rate_vs_sft", "win vs SFT", "{:.3f}"),
           ("kl_vs_sft", "KL vs SFT", "{:.2f}"), ("length", "length", "{:.1f}"), ("seconds", "seconds", "{:.0f}")]
REFERENCE_ROWS = [("best_possible", "best possible"), ("best_constant", "best constant")]


def write_table(results, path):
    """results.md: a row per method (mean ± std over seeds when aggregated), then the task's
    reference rows (gold reward only: nothing is trained for them), the split and the judge."""
    rows = results["methods"]
    cols = [c for c in COLUMNS if c[0] in next(iter(rows.values()))]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in rows.items():
        cells = []
        for key, _, fmt in cols:
            cell = fmt.format(row[key])
            if f"{key}_std" in row:
                cell += " ± " + fmt.format(row[f"{key}_std"]).lstrip("+")
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    reference = results.get("reference") or {}
    for key, name in REFERENCE_ROWS:
        if key in reference:
            lines.append(f"| *{name}* | " + " | ".join("{:+.3f}".format(reference[key]) if c[0] == "gold_reward"
                                                      else "" for c in cols) + " |")
    if "best_constant_text" in reference:
        lines.append(f"\nbest constant: {reference['best_constant_text']!r}")
    s = results.get("split", {})
    if s.get("delta") is not None:
        lines.append(f"\nsplit: delta {s['delta']:.3g}, easy {s['easy']}, hard {s['hard']}")
        if s.get("easy_label_agreement") is not None:
            lines[-1] += (f", label agreement with gold: easy {s['easy_label_agreement']:.3f}, "
                          f"hard {s['hard_label_agreement']:.3f}")
    if results.get("win_rate_judge"):
        lines.append(f"win rates judged by: {results['win_rate_judge']}")
    if results.get("reused"):
        lines.append(f"reused stages: {', '.join(results['reused'])}")
    text = "\n".join(lines) + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print("\n" + text)


def aggregate(runs):
    """Mean and standard deviation over seeds of every figure of every method."""
    out = {}
    for m in runs[0]["methods"]:
        out[m] = {}
        for key in runs[0]["methods"][m]:
            xs = [r["methods"][m][key] for r in runs]
            out[m][key] = statistics.mean(xs)
            out[m][f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    split = {k: statistics.mean(r["split"][k] for r in runs) if runs[0]["split"][k] is not None else None
             for k in runs[0]["split"]}
    reference = None
    if runs[0].get("reference"):  # the evaluation prompts differ by seed
        reference = {k: statistics.mean(r["reference"][k] for r in runs) for k, _ in REFERENCE_ROWS}
    return {"methods": out, "split": split, "reference": reference, "win_rate_judge": runs[0].get("win_rate_judge"),
            "seeds": [r["config"]["seed"] for r in runs], "config": runs[0]["config"]}
