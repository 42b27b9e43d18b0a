"""What a run shows a reader: the gap histogram, training curves, the results table, the mean
and spread over seeds and paired intervals. Pictures need matplotlib, which is optional: without
it, text only. (publish/documents.py makes RESULTS.md from the committed runs.)"""
import datetime
import json
import math
import os
import statistics
import subprocess

import torch

from plumbing import distributed
from plumbing.files import write_text


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
    """matplotlib's pyplot without a display, or None: pictures are optional (and rank 0's)."""
    if not distributed.is_main():
        return None
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


# ----------------------------------------------------------------------------- figures without matplotlib

def svg_plot(series, xlabel, ylabel, title, width=560, height=300, xticks=None):
    """A line plot as SVG text, with no plotting library: series [(label, xs, ys, band)], band
    None or (lows, highs) drawn as a shaded area; xticks, if given, labels x = 0, 1, ... by name.
    Deterministic, so a regenerated figure is the same file byte for byte."""
    colors = ["#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c", "#dd8452"]
    left, right, top, bottom = 56, 150, 28, 40
    xs = [x for _, sx, _, _ in series for x in sx]
    ys = [y for _, _, sy, band in series for y in list(sy) + (list(band[0]) + list(band[1]) if band else [])]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)  # no line on the frame
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: top + (y1 - y) / (y1 - y0) * (height - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13">{title}</text>',
           f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">{xlabel}</text>',
           f'<text transform="translate(14 {(top + height - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">{ylabel}</text>',
           f'<path d="M{left} {top}V{height - bottom}H{width - right}" fill="none" stroke="black"/>']
    for i in range(5):  # ticks
        y, x = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        if xticks is None:
            label = f"{x:.0f}" if x1 - x0 >= 8 else f"{x:g}"
            out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{label}</text>')
    for x, name in enumerate(xticks or []):
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{name}</text>')
    for i, (label, sx, sy, band) in enumerate(series):
        color = colors[i % len(colors)]
        if band:
            ring = list(zip(sx, band[1])) + list(zip(sx, band[0]))[::-1]
            out.append(f'<polygon points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in ring)}" fill="{color}" '
                       f'fill-opacity="0.15"/>')
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out.append(f'<text x="{width - right + 8}" y="{top + 14 * i + 4}" fill="{color}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ----------------------------------------------------------------------------- the results table

COLUMNS = [("gold_reward", "gold reward", "{:+.3f}"), ("judge_score", "judge score", "{:+.3f}"),
           ("greedy", "greedy", "{:+.3f}"), ("well_formed", "well formed", "{:.2f}"), ("rm_score", "RM score", "{:+.3f}"),
           ("win_vs_sft", "win", "{:.2f}"), ("tie_vs_sft", "tie", "{:.2f}"), ("loss_vs_sft", "loss", "{:.2f}"),
           ("win_vs_chosen", "win vs chosen", "{:.2f}"), ("kl_vs_sft", "KL vs SFT", "{:.2f}"),
           ("length", "length", "{:.1f}"), ("dpo_pairs", "DPO pairs", "{:.0f}"), ("ppo_rollouts", "PPO rollouts", "{:.0f}"),
           ("seconds", "seconds", "{:.0f}")]
REFERENCE_ROWS = [("best_possible", "best possible"), ("best_constant", "best constant")]


def write_table(results, path):
    """results.md (table_text), also printed."""
    text = table_text(results)
    write_text(path, text)
    print("\n" + text)


def table_text(results, methods=None):
    """A row per method (mean ± std over seeds when aggregated) with MPO minus it and its interval,
    then the task's reference rows (gold reward only: nothing is trained for them), the split and
    the judge. methods: the rows to show (default all)."""
    rows, vs_mpo = results["methods"], results.get("vs_mpo") or {}
    rows = {m: row for m, row in rows.items() if methods is None or m in methods}
    cols = [c for c in COLUMNS if c[0] in next(iter(rows.values()))]
    extra = ["MPO − method (95% CI)"] if vs_mpo else []
    lines = ["| method | " + " | ".join([c[1] for c in cols] + extra) + " |", "|---" * (len(cols) + len(extra) + 1) + "|"]
    for m, row in rows.items():
        cells = []
        for key, _, fmt in cols:
            cell = fmt.format(row[key])
            if f"{key}_std" in row:
                cell += " ± " + fmt.format(row[f"{key}_std"]).lstrip("+")
            cells.append(cell)
        if vs_mpo:
            cells.append(interval_text(vs_mpo.get(m)))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    reference = results.get("reference") or {}
    for key, name in REFERENCE_ROWS:
        if key in reference:
            lines.append(f"| *{name}* | " + " | ".join("{:+.3f}".format(reference[key]) if c[0] == "gold_reward"
                                                      else "" for c in cols + extra) + " |")
    if "best_constant_text" in reference:
        lines.append(f"\nbest constant: {reference['best_constant_text']!r}")
    s = results.get("split", {})
    if s.get("delta") is not None:
        lines.append(f"\nsplit: delta {s['delta']:.3g}, easy {s['easy']:g}, hard {s['hard']:g}")
        if s.get("easy_label_agreement") is not None:
            lines[-1] += (f", label agreement with gold: easy {s['easy_label_agreement']:.3f}, "
                          f"hard {s['hard_label_agreement']:.3f}")
    if results.get("reward_model"):
        lines.append(f"reward model: {results['reward_model']['folder']} (--reward-model; the rm stage was skipped)")
    if results.get("win_rate_judge"):
        lines.append(f"win, tie and loss against SFT, prompt by prompt, judged by: {results['win_rate_judge']}")
    if results.get("vs_mpo"):
        lines.append(f"MPO − method: the judge's mean difference, paired over {results['vs_mpo_over']}, "
                     "with its 95% t interval")
    if results.get("seconds") and "per_seed" not in results:
        lines.append("seconds: a method's DPO and PPO stages and the shared stages it needs (reward model, split), "
                     "without held-out probes; every stage: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    if results.get("reused"):
        lines.append(f"reused stages: {', '.join(results['reused'])}")
    return "\n".join(lines) + "\n"


def assemble(table, costs, runner, task, split, policies, config, judge=None):
    """A run's results.json: the eval stage's table with each method's costs (runs.method_costs),
    the task's reference rows, the split, what judged (and on real data the judge stage's summary,
    `judge`), each stage's seconds, and the run's settings."""
    return {"methods": {m: {**row, **costs.get(m, {"seconds": 0, "dpo_pairs": 0, "ppo_rollouts": 0})}
                        for m, row in table["methods"].items()},
            "vs_mpo": table["vs_mpo"], "vs_mpo_over": f"{len(task['eval'])} prompts (one seed: sampling noise only)",
            "reference": task["reference"](task["eval"]) if task["reference"] else None,
            "win_rate_judge": "gold reward" if task["gold"] else (
                f"the judge, a reward model trained on {len(task['judge'])} held-out pairs that no policy or training "
                "RM saw (judge score; RM score is the training reward model's, which PPO optimised)"),
            **({"judge": judge} if judge else {}),
            "split": {k: split.get(k) for k in ("delta", "easy", "hard", "easy_label_agreement", "hard_label_agreement",
                                                "flipped_share") if k in split or k != "flipped_share"},
            "seconds": runner.seconds, "reused": runner.reused, "policies": policies, "config": config,
            "provenance": provenance()}


def interval_text(d, fmt="{:+.3f}"):
    """A paired_interval as "+0.123 [+0.050, +0.196]" ("" for none; the mean alone for one unit)."""
    if d is None:
        return ""
    mean = fmt.format(d["mean"])
    return mean if d["low"] is None else f"{mean} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def aggregate(runs):
    """Mean and standard deviation over seeds of every figure of every method, each seed's rows,
    and MPO minus each method paired over seeds (the interval that covers training's randomness)."""
    out = {}
    for m in runs[0]["methods"]:
        out[m] = {}
        for key in runs[0]["methods"][m]:
            xs = [r["methods"][m][key] for r in runs]
            out[m][key] = statistics.mean(xs)
            out[m][f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    mean = lambda xs: ({k: statistics.mean(x[k] for x in xs) for k in xs[0]} if isinstance(xs[0], dict)
                       else None if xs[0] is None else statistics.mean(xs))  # flipped_share: a share per set
    split = {k: mean([r["split"][k] for r in runs]) for k in runs[0]["split"]}
    reference = None
    if runs[0].get("reference"):  # the evaluation prompts differ by seed
        reference = {k: statistics.mean(r["reference"][k] for r in runs) for k, _ in REFERENCE_ROWS}
    judge = next(k for k in ("gold_reward", "judge_score", "rm_score") if k in runs[0]["methods"]["sft"])
    vs_mpo = {m: paired_interval([r["methods"]["mpo"][judge] for r in runs], [r["methods"][m][judge] for r in runs])
              for m in runs[0]["methods"] if m != "mpo"} if "mpo" in runs[0]["methods"] else {}
    return {"methods": out, "vs_mpo": vs_mpo, "vs_mpo_over": f"{len(runs)} seeds", "split": split,
            "reference": reference, "win_rate_judge": runs[0].get("win_rate_judge"),
            "per_seed": {m: [r["methods"][m] for r in runs] for m in runs[0]["methods"]},
            "seeds": [r["config"]["seed"] for r in runs], "config": runs[0]["config"],
            **({"reward_model": runs[0]["reward_model"]} if "reward_model" in runs[0] else {})}


# ----------------------------------------------------------------------------- over seeds

LABELS = {"sft": "SFT", "mpo_stage1": "MPO stage 1 (DPO on easy, ref SFT)", "mpo": "**MPO** (then PPO on hard, ref DPO)",
          "dpo": "DPO (all pairs, ref SFT)", "ppo": "PPO (all prompts, from and ref SFT)",
          "ppo_matched": "PPO matched (MPO's stage-2 rollouts)",
          "no_selection": "no selection (DPO on all pairs, PPO on all prompts)",
          "random_split": "random split (random sets of MPO's sizes)",
          "gold_split": "gold split (on the gold reward's gap)",
          "cdpo": "conservative DPO (all pairs, told the flip rate)",
          "rdpo": "robust DPO (all pairs, told the flip rate)"}  # the others: their names in mpo.METHODS


def summary_table(runs):
    """The compact table of an experiment (one results.json per seed): the judge's score (the gold
    reward, or on real data the judge reward model's; mean ± sd over seeds), the training reward
    model's, well formed (mean, lowest seed), KL to SFT, length, what each row trained on, and MPO
    minus the row with its 95% t interval, paired over seeds (over prompts for one seed), with the
    units where MPO is ahead."""
    res = aggregate(runs) if len(runs) > 1 else runs[0]
    unit = "seeds" if len(runs) > 1 else "prompts"
    judge = "gold_reward" if "gold_reward" in runs[0]["methods"]["sft"] else "judge_score"
    lines = [f"| method | {'gold reward' if judge == 'gold_reward' else 'judge score'} | RM score | well formed "
             f"(lowest seed) | KL vs SFT | length | DPO pairs | PPO rollouts | seconds | MPO − method (95% CI) | "
             f"MPO ahead ({unit}) |", "|---" * 11 + "|"]
    for m, row in res["methods"].items():
        score = f"{row[judge]:+.3f}" + (f" ± {row[judge + '_std']:.3f}" if len(runs) > 1 else "")
        formed = (f"{row['well_formed']:.2f} ({min(r['methods'][m]['well_formed'] for r in runs):.2f})"
                  if "well_formed" in row else "")
        counted = "dpo_pairs" in row  # results from before the costs were counted leave these blank
        cost = " | ".join(f"{row[k]:.0f}" if counted else "" for k in ("dpo_pairs", "ppo_rollouts", "seconds"))
        d = res["vs_mpo"].get(m)
        ahead = "" if d is None else f"{d['wins']} of {d['n']}"
        lines.append(f"| {LABELS.get(m, m)} | {score} | {row['rm_score']:+.3f} | {formed} | {row['kl_vs_sft']:.2f} | "
                     f"{row['length']:.1f} | {cost} | {interval_text(d)} | {ahead} |")
    for key, name in REFERENCE_ROWS:
        if (res.get("reference") or {}).get(key) is not None:
            lines.append(f"| *{name}* (no training) | {res['reference'][key]:+.3f} |" + " |" * 9)
    return "\n".join(lines)


def closing(runs):
    """The share of the distance from SFT to the best possible gold that MPO closes, per seed."""
    return [(r["methods"]["mpo"]["gold_reward"] - r["methods"]["sft"]["gold_reward"]) /
            (r["reference"]["best_possible"] - r["methods"]["sft"]["gold_reward"]) for r in runs]


# ----------------------------------------------------------------------------- paired intervals

# Student's t, the 97.5% quantile for 1..30 degrees of freedom (a two-sided 95% interval)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df):
    """The 97.5% quantile of Student's t: the table, then the Cornish-Fisher expansion around the
    normal's 1.96 (within 1e-3 of the exact value beyond 30 degrees of freedom)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_interval(a, b):
    """The mean of a - b over paired units (prompts, or seeds) and its 95% t interval,
    mean -+ t975(n - 1) * sd(a - b) / sqrt(n): {"mean", "low", "high", "n", "wins"}, wins the units
    where a > b; low and high are None for one unit."""
    d = [x - y for x, y in zip(a, b)]
    m = statistics.fmean(d)
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return {"mean": m, "low": None if half is None else m - half, "high": None if half is None else m + half,
            "n": len(d), "wins": sum(x > 0 for x in d)}


# ----------------------------------------------------------------------------- provenance

def provenance():
    """Where and how a run ran, for its results.json: the commit of the code (None outside a git
    checkout; "+changes" when the work tree differs from it), the date, torch, the machine."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *args: subprocess.run(["git", "-C", here, *args], capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+changes"
    except OSError:  # no git
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    return {"commit": commit, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "machine": device, "threads": torch.get_num_threads()}
