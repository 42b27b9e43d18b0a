"""A user's mistake gets one line on stderr naming the file, the line and the field, exit status 2,
and nothing written to the run folder."""
import dataclasses
import gzip
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from plumbing import checks
import train
from plumbing.checkpoint import save_checkpoint
from model import GPT, GPTConfig
from plumbing.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def truncated_gzip():
    blob = gzip.compress(jsonl(*[GOOD] * 200))
    return blob[: len(blob) // 2]


# (name, file bytes, extra flags, what the message must say)
DATA_CASES = [
    ("not_json", jsonl(GOOD, "{oops"), [], ":2: not JSON"),
    ("missing_field", jsonl(GOOD, {"prompt": "a", "chosen": " b"}), [], ":2: missing field 'rejected'"),
    ("mistyped_field", jsonl({**GOOD, "chosen": 3}), [], ":1: field 'chosen' must be a string, not int"),
    ("empty_response", jsonl(GOOD, GOOD, {**GOOD, "rejected": ""}), [], ":3: field 'rejected' is empty"),
    ("empty_prompt", jsonl(GOOD, {**GOOD, "prompt": ""}), [], ":2: field 'prompt' is empty"),
    ("invalid_utf8", jsonl(GOOD) + b'{"prompt": "\xff\xfe"}\n', [], ":2: not valid UTF-8"),
    ("empty_file", b"\n\n", [], ": empty file"),
    ("truncated_gzip", truncated_gzip(), [], ": not a complete gzip file"),
    ("format_mismatch", jsonl(GOOD), ["--format", "tldr"], ":1: missing field 'info' (reading as tldr; the line looks like jsonl)"),
    ("not_an_object", jsonl(GOOD, "[1, 2]"), [], ":2: expected a JSON object, not list"),
]


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    err = capsys.readouterr().err
    return info.value.code, err


def check_one_line(code, err, *needles):
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("name, content, flags, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tmp_path, capsys, name, content, flags, message):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    out = tmp_path / "run"
    code, err = run_main(["--preset", "micro", "--data", str(path), "--out", str(out), *flags], capsys)
    check_one_line(code, err, str(path) + message)
    assert not out.exists()


def test_chosen_identical_to_rejected_is_skipped_and_counted(tmp_path, capsys):
    import data
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl(GOOD, {**GOOD, "rejected": GOOD["chosen"]}, GOOD))
    logs = []
    assert [r["line"] for r in data.load_preferences(str(path), log=logs.append)] == [1, 3]
    assert logs[-1].endswith("skipped chosen equals rejected lines: 1")


@pytest.mark.parametrize("flags, message", [
    (["--preset", "huge"], "--preset huge: not a preset"),
    (["--stages", "sft,dpo,magic"], "unknown stage 'magic'"),
    (["--ablations", "nope"], "unknown row 'nope'"),
    (["--eval-data", os.path.join(ROOT, "README.md")], "--eval-data and --sft-data need --data"),
    (["--data", "no/such/file.jsonl"], "no/such/file.jsonl: no such file"),
    (["--delta-sweep", "0.5,abc"], "--delta-sweep 0.5,abc: 'abc' is not a number"),
])
def test_bad_flags(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, err = run_main(["--out", str(out), *flags], capsys)
    check_one_line(code, err, message)
    assert not out.exists()


def small_checkpoint(folder):
    save_checkpoint(GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=16)), folder)


# (folder name, changes to config.json's "model", files to write, what the message must say);
# "missing" is never created
INIT_CASES = [
    ("shapes", {"n_embd": 32}, {}, "shapes/model.safetensors: shapes do not match config.json"),
    ("broken", None, {"config.json": '{"kind": "gpt",\n "model": '}, "broken/config.json:2: not JSON"),
    ("field", None, {"config.json": '{"kind": "gpt", "model": {"n_layer": 1, "colour": 3}}'},
     "field/config.json: field 'model'"),
    ("badtok", None, {"tokenizer.json": '{"version": "1.0"}'}, "badtok/tokenizer.json: not a tokenizer.json"),
    ("missing", None, {}, "missing: no such folder"),
    ("notok", None, {}, "notok: no tokenizer.json beside the weights"),
    ("listed", None, {"config.json": "[1, 2]"}, "listed/config.json: expected a JSON object, not list"),
    ("heads", {"n_head": 3}, {}, "heads/config.json: n_embd 16 is not a multiple of n_head 3"),
]


@pytest.mark.parametrize("name, model_changes, files, message", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_bad_init_folder(tmp_path, capsys, name, model_changes, files, message):
    folder, out = tmp_path / name, tmp_path / "run"
    if name != "missing":
        small_checkpoint(folder)
    if model_changes:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model"].update(model_changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    for file, text in files.items():
        (folder / file).write_text(text)
    code, err = run_main(["--preset", "micro", "--init", str(folder), "--out", str(out)], capsys)
    check_one_line(code, err, message)
    assert not out.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_init_weights_stop_before_any_work(tmp_path, capsys, bad):
    """A NaN or inf in --init's weights: one line naming the file and the tensor, nothing written
    (before, SFT's first step stopped with a NaN loss and a hint about the learning rate)."""
    from safetensors.torch import load_file, save_file
    folder, out = tmp_path / "gpt", tmp_path / "run"
    small_checkpoint(folder)
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.weight"][3, 5] = bad
    save_file(state, str(folder / "model.safetensors"))
    code, err = run_main(["--preset", "micro", "--init", str(folder), "--out", str(out)], capsys)
    check_one_line(code, err, f"{folder / 'model.safetensors'}: tensor 'transformer.h.0.mlp.c_fc.weight' holds "
                              "non-finite values")
    assert not out.exists()


def test_a_lora_target_the_init_model_lacks(tmp_path, capsys):
    """--init's layout decides which projections exist: a GPT-2 folder has no q_proj."""
    folder, out = tmp_path / "gpt", tmp_path / "run"
    small_checkpoint(folder)
    code, err = run_main(["--preset", "micro", "--init", str(folder), "--out", str(out), "--lora-rank", "4",
                          "--lora-targets", "q_proj"], capsys)
    check_one_line(code, err, "--lora-targets q_proj: a GPT has no projection 'q_proj'")
    assert not out.exists()


def test_the_real_command_line_prints_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(GOOD, {"prompt": 1}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(path),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}:2: field 'prompt' must be a string, not int (reading as jsonl)"
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    code, err = run_main(["--out", str(out)], capsys)
    check_one_line(code, err, "is a file, not a folder")


def test_a_damaged_step_state_names_its_file(tmp_path):
    from plumbing.checkpoint import CheckpointError
    from plumbing.checkpoint import StepState
    (tmp_path / "step_state.safetensors").write_bytes(b"half a file")
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(CheckpointError, match="step_state.safetensors: not a safetensors file"):
        StepState(str(tmp_path), 1, 10, {"model": model}, {}).restore()


# ----------------------------------------------------------------------------- every setting, checked before any work

def all_fields():
    """(flag, field) of every field of RunConfig and of each stage config."""
    for f in dataclasses.fields(train.RunConfig):
        if f.name not in train.STAGE_CONFIGS:
            yield "--" + f.name.replace("_", "-"), f
    for name, cls in train.STAGE_CONFIGS.items():
        for f in dataclasses.fields(cls):
            yield "--" + ("" if name == "split" else name + "-") + f.name.replace("_", "-"), f


def outside(interval, integer):
    """Values just outside an interval such as "[0, 1)"; for floats also nan and the infinities."""
    lo, hi = (float(end) for end in interval[1:-1].split(","))
    values = [lo - 1 if interval[0] == "[" else lo] if math.isfinite(lo) else []
    values += [hi + 1 if interval[-1] == "]" else hi] if math.isfinite(hi) else []
    return [str(int(v)) if integer else repr(v) for v in values] + ([] if integer else ["nan", "inf", "-inf"])


# a bad value of each kind of string setting, from a folder holding a file "f" and a folder "d"
KIND_BAD = {
    "file": lambda d: [str(d / "d"), str(d / "missing.jsonl")],
    "folder": lambda d: [str(d / "f"), str(d / "missing")],
    "run folder": lambda d: [str(d / "f"), str(d / "f" / "run"), ""],
    "preset": lambda d: ["huge"],
    "stages": lambda d: ["sft,magic"],
    "ablations": lambda d: ["nope", "all,reversed"],
    "device": lambda d: ["tpu", "cuda:99"],
    "lora targets": lambda d: ["attn,magic", ","],
    "lora stages": lambda d: ["dpo,split", ""],
    "chat template": lambda d: [str(d / "d"), str(d / "missing.jinja"), ""],
}


def bad_values(field, d):
    """What a field's metadata rules out; a field that declares nothing fails here."""
    meta = field.metadata
    if field.type is bool:
        return ["yes"]  # a switch takes no value
    if "choices" in meta:
        return ["nope"]
    if meta.get("kind") == "numbers":
        return ["1,abc"] + [f"1,{v}" for v in outside(meta["range"], False)]
    if "kind" in meta:
        return KIND_BAD[meta["kind"]](d)
    assert "range" in meta, f"{field.name} declares no range, kind or choices: train.check cannot check it"
    return outside(meta["range"], field.type is int)


FIELD_FLAGS = [flag for flag, _ in all_fields()]


def test_every_setting_declares_what_it_may_hold():
    """A new field needs a range, a kind or choices (plumbing/checks.py); the validator walks them all."""
    assert [flag for flag, _, _ in checks.settings(train.RunConfig())] == FIELD_FLAGS
    assert set(KIND_BAD) == set(train.KINDS)
    for flag, f in all_fields():
        meta = f.metadata
        if f.type is bool:
            continue
        assert "range" in meta or "kind" in meta or "choices" in meta, f"{flag} declares nothing to check"
        assert meta.get("kind") in (None, "numbers", *train.KINDS), flag
        if f.type in (int, float) or meta.get("kind") == "numbers":
            assert "range" in meta, f"{flag}: a number needs a range"
        if "range" in meta:
            checks.in_range(0, meta["range"])  # parses
        assert bad_values(f, pathlib.Path("d")), flag


@pytest.mark.parametrize("preset", list(train.PRESETS))
def test_the_presets_pass_their_checks(preset, tmp_path):
    given = ["--init", str(tmp_path)] if preset == "gpu24" else []  # adapters on a model of one's own
    run = train.parse_args(["--preset", preset, *given])
    assert train.check(run) is None
    assert all(checks.problem(f.default, f.metadata, train.KINDS) is None for _, f in all_fields()
               if f.default is not dataclasses.MISSING and f.name not in ("device", "dtype"))


@pytest.mark.parametrize("flag", FIELD_FLAGS)
def test_a_bad_value_of_any_setting_stops_the_run(tmp_path, capsys, flag):
    """Every field: each value outside what it declares gives one line naming the flag, exit 2,
    and nothing written."""
    field = dict(all_fields())[flag]
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d").mkdir()
    out = tmp_path / "run"
    values = bad_values(field, tmp_path)
    assert values
    for value in values:
        code, err = run_main(["--preset", "micro", "--out", str(out), f"{flag}={value}"], capsys)
        check_one_line(code, err, flag)
        assert sorted(os.listdir(tmp_path)) == ["d", "f"] and not os.listdir(tmp_path / "d"), (flag, value)


@pytest.mark.parametrize("flags", [["--label-noise", "nan"], ["--label-noise", "inf"], ["--delta", "nan"],
                                   ["--dpo-beta", "inf"], ["--ppo-gamma", "nan"], ["--eval-temperature", "inf"],
                                   ["--delta-sweep", "0,nan"], ["--noise-sweep", "inf"]])
def test_nan_and_inf_are_refused(tmp_path, capsys, flags):
    out = tmp_path / "run"
    code, err = run_main(["--preset", "micro", "--out", str(out), *flags], capsys)
    check_one_line(code, err, f"{flags[0]} {flags[1]}:", "finite")
    assert not out.exists()


# (flag, path under tmp_path, what the message must say); tmp_path holds a file "f" and a folder "d"
PATH_CASES = [
    ("--out", "f", "is a file, not a folder"),
    ("--out", "f/run", "f is a file, not a folder"),
    ("--data", "d", "is a folder, not a file"),
    ("--data", "missing.jsonl", "missing.jsonl: no such file"),
    ("--eval-data", "d", "is a folder, not a file"),
    ("--sft-data", "d", "is a folder, not a file"),
    ("--init", "f", "is a file, not a folder"),
    ("--init", "missing", "missing: no such folder"),
]


@pytest.mark.parametrize("flag, path, message", PATH_CASES, ids=[f"{c[0]}-{c[1]}" for c in PATH_CASES])
def test_a_path_of_the_wrong_kind(tmp_path, capsys, flag, path, message):
    (tmp_path / "f").write_bytes(jsonl(GOOD))
    (tmp_path / "d").mkdir()
    out = tmp_path / "run"
    data = [] if flag in ("--data", "--init") else ["--data", str(tmp_path / "f")]
    code, err = run_main(["--preset", "micro", "--out", str(out), *data, flag, str(tmp_path / path)], capsys)
    check_one_line(code, err, f"{flag} {tmp_path / path}: ", message)
    assert sorted(os.listdir(tmp_path)) == ["d", "f"] and not os.listdir(tmp_path / "d")


README = os.path.join(ROOT, "README.md")  # a file that exists: a contradiction is found before it is read

# (flags on the micro preset, what the message must say)
CONTRADICTIONS = [
    (["--stages", ","], "--stages: name at least one stage"),
    (["--ablations", "all,reversed"], "--ablations all,reversed: all stands alone"),
    (["--sft-data", README], "--eval-data and --sft-data need --data"),
    (["--format", "hh"], "--format hh is the format of --data: give --data"),
    (["--data", README, "--label-noise", "2"], "--label-noise shapes the built-in task: not with --data"),
    (["--data", README, "--noise-sweep", "1,2"], "--noise-sweep shapes the built-in task: not with --data"),
    (["--data", README, "--n-pref", "100"], "--n-pref shapes the built-in task: not with --data"),
    (["--init", os.path.join(ROOT, "tests"), "--n-layer", "3"], "--n-layer: the model's shape comes from --init"),
    (["--bias-kind", "polite"], "--bias-kind polite says what biased annotators prefer: it needs --annotator-bias"),
    (["--n-head", "3"], "--n-embd 64 is not a multiple of --n-head 3"),
    (["--max-new-tokens", "96"], "--max-new-tokens 96 leaves no room for the prompt in --block-size 96"),
    (["--easy-fraction", "0.001"], "--easy-fraction 0.001 of --n-pref 300 pairs leaves the easy set empty"),
    (["--easy-fraction", "0.999"], "--easy-fraction 0.999 of --n-pref 300 pairs leaves the hard set empty"),
    (["--sft-batch-size", "3", "--grad-accum", "4"], "--sft-batch-size 3 is smaller than 1 ranks x --grad-accum 4"),
    (["--rm-batch-size", "3", "--grad-accum", "4"], "--rm-batch-size 3 is smaller than 1 ranks x --grad-accum 4"),
    (["--dpo-batch-size", "3", "--grad-accum", "4"], "--dpo-batch-size 3 is smaller than 1 ranks x --grad-accum 4"),
    (["--ppo-minibatches", "17"], "--ppo-minibatches 17 is more than the 16 rollouts of each of the 1 ranks"),
    (["--ppo-kl-target", "6", "--ppo-kl-coef", "0"], "--ppo-kl-target scales --ppo-kl-coef"),
    (["--ppo-kl-target", "6", "--ppo-kl-horizon", "3"], "--ppo-kl-horizon 3: with --ppo-kl-target, needs more than "
                                                        "--ppo-rollouts / 5 = 3.2"),
    (["--dpo-loss-type", "ipo", "--dpo-label-smoothing", "0.1"],
     "--dpo-label-smoothing is for --dpo-loss-type sigmoid"),
    (["--export-hf", "--stages", "tokenizer,sft"], "--export-hf runs after the eval stage: add eval to --stages"),
    (["--delta-sweep", "0,1", "--stages", "tokenizer"], "--delta-sweep runs after the eval stage"),
    (["--lora-alpha", "8"], "--lora-alpha sets the adapters: it needs --lora-rank above 0"),
    (["--lora-rank", "4", "--lora-stages", "sft"], "--lora-stages sft: adapters on a randomly initialised model"),
    (["--preset", "gpu24"], "--preset gpu24 trains adapters on a model of your own: give --init"),
    (["--lora-rank", "4", "--lora-targets", "q_proj"], "--lora-targets q_proj: a GPT has no projection 'q_proj'"),
    (["--checkpointing", "--stages", "tokenizer,split,eval"], "--checkpointing saves memory in training: "
                                                              "--stages tokenizer,split,eval trains nothing"),
]


@pytest.mark.parametrize("flags, message", CONTRADICTIONS, ids=[" ".join(c[0][::2]) for c in CONTRADICTIONS])
def test_settings_that_contradict_each_other(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, err = run_main(["--preset", "micro", "--out", str(out), *flags], capsys)
    check_one_line(code, err, message)
    assert not out.exists()


@pytest.mark.parametrize("ranks, flags, message", [
    (2, ["--grad-accum", "2", "--rm-batch-size", "3"], "--rm-batch-size 3 is smaller than 2 ranks x --grad-accum 2"),
    (4, ["--ppo-minibatches", "5"], "--ppo-minibatches 5 is more than the 4 rollouts of each of the 4 ranks "
                                    "(--ppo-rollouts 16)"),
    (3, [], "--ppo-rollouts 16 must split evenly over the 3 ranks"),
])
def test_contradictions_with_the_ranks(tmp_path, capsys, monkeypatch, ranks, flags, message):
    monkeypatch.setenv("WORLD_SIZE", str(ranks))  # as torchrun sets it, readable before setup
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--preset", "micro", "--out", str(tmp_path / "run"), *flags])
    check_one_line(info.value.code, capsys.readouterr().err, message)


def test_the_smallest_settings_that_run_pass():
    """The smallest task the pipeline runs on (n_pref 2: one easy pair, one hard) and the edges of ranges."""
    run = train.parse_args(["--preset", "micro", "--n-pref", "2", "--n-sft", "1", "--easy-fraction", "0.5",
                            "--sft-steps", "0", "--ppo-gamma", "0", "--ppo-lam", "1", "--delta", "-3",
                            "--sft-batch-size", "4", "--grad-accum", "4", "--ppo-minibatches", "16",
                            "--ppo-kl-target", "6", "--ppo-kl-horizon", "4", "--noise-sweep", "0.5,2"])
    assert train.check(run) is None


# ----------------------------------------------------------------------------- byte-order marks and CRLF

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_a_preference_file_with_a_bom_and_crlf_loads_the_same(tmp_path, packed):
    import data
    rows = jsonl(GOOD, {**GOOD, "chosen": " Hi there!\r\nBye."}, {**GOOD, "prompt": "\n\nHuman: ok\n\nAssistant:"})
    windows = BOM + rows.replace(b"\n", b"\r\n")
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_bytes(gzip.compress(rows) if packed else rows)
    bom.write_bytes(gzip.compress(windows) if packed else windows)
    assert data.load_preferences(str(bom), log=lambda _: None) == data.load_preferences(str(plain), log=lambda _: None)
    demos = tmp_path / "demos.jsonl"
    demos_rows = jsonl({"prompt": "a", "response": " b"}, {"prompt": "c", "response": " d"})
    demos.write_bytes(BOM + demos_rows.replace(b"\n", b"\r\n"))
    assert data.load_demonstrations(str(demos)) == [("a", " b"), ("c", " d")]


def test_json_files_with_a_bom_load(tmp_path):
    from plumbing.hf import load_gpt
    small_checkpoint(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_bytes(BOM + config.read_bytes().replace(b"\n", b"\r\n"))
    assert load_gpt(str(tmp_path / "ckpt"), "cpu").config.n_embd == 16
    tok = Tokenizer.train(["hello world, hello there"] * 20, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "bom.json").write_bytes(BOM + (tmp_path / "tokenizer.json").read_bytes())
    loaded = Tokenizer.load(str(tmp_path / "bom.json"))
    assert loaded.encode("hello there") == tok.encode("hello there") and loaded.vocab_size == tok.vocab_size
