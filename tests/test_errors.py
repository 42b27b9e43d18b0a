"""A user's mistake gets one line on stderr naming the file, the line and the field, exit status 2,
and nothing written to the run folder."""
import gzip
import json
import os
import subprocess
import sys

import pytest

import train
from checkpoint import save_checkpoint
from model import GPT, GPTConfig

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
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--stages", "sft,dpo,magic"], "unknown stage 'magic'"),
    (["--ablations", "nope"], "unknown ablation 'nope'"),
    (["--eval-data", "x.jsonl"], "--eval-data and --sft-data need --data"),
    (["--data", "no/such/file.jsonl"], "no/such/file.jsonl: no such file"),
    (["--delta-sweep", "0.5,abc"], "--delta-sweep and --noise-sweep take comma lists of numbers"),
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
    ("missing", None, {}, "missing/config.json: no such file"),
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
    from checkpoint import CheckpointError
    from training import StepState
    (tmp_path / "step_state.safetensors").write_bytes(b"half a file")
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(CheckpointError, match="step_state.safetensors: not a safetensors file"):
        StepState(str(tmp_path), 1, 10, {"model": model}, {}).restore()
