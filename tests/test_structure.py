"""The shape of the code: imports run one way, a method is defined once (METHODS), and a run folder
has one writer at a time."""
import ast
import os
import subprocess
import sys

import pytest

from bench import figures as bench
import train
from mpo import ABLATIONS, BASELINES, METHODS, method_stages
from plumbing.runs import locked
from training import StageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ["plumbing", "bench", "publish"]  # the machinery; the method is the top level's files
# each module may import only modules of lower layers (a folder's modules are named folder.module)
LAYERS = [["task", "plumbing.distributed", "plumbing.packing", "sampling", "bench.peak_memory", "plumbing.chat",
           "plumbing.checks"], ["plumbing.files", "plumbing.progress"], ["data"], ["plumbing.tokenizer", "model"], ["llama", "lora"],
          ["plumbing.checkpoint"], ["plumbing.hf", "training", "plumbing.report"],
          ["plumbing.runs", "plumbing.ppo_batches"],
          ["sft", "reward", "dpo"], ["ppo", "evaluate", "plumbing.hf_reward"], ["stages"], ["mpo"], ["train"],
          ["bench.memory", "bench.compile", "publish.collect"], ["bench.figures", "bench.anchors", "bench.pipeline", "publish.documents"],
          ["bench.gpu_check"]]
MODULES = {m for layer in LAYERS for m in layer}
ANCHOR_PACKAGES = {"trl", "accelerate", "datasets"}  # bench/anchors.py's alone, from .anchors/


def path_of(module):
    return os.path.join(ROOT, module.replace(".", os.sep) + ".py")


def modules():
    """Every module of the tree: the top level's files, and folder.module for each folder's (less
    its __init__ and __main__, which only name the folder and run its main)."""
    found = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    for folder in FOLDERS:
        found |= {f"{folder}.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, folder))
                  if f.endswith(".py") and f not in ("__init__.py", "__main__.py")}
    return found


def imports(name):
    """The modules `name` imports; `from plumbing import files` counts as plumbing.files."""
    tree = ast.parse(open(path_of(name)).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def project_imports(name):
    return imports(name) & MODULES


def test_imports_run_one_way():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    assert set(layer_of) == modules(), "a new module needs a layer"
    for module, layer in layer_of.items():
        for imported in project_imports(module):
            assert layer_of[imported] < layer, f"{module} imports {imported}"


def test_the_method_imports_neither_the_benchmarks_nor_the_publishing():
    """bench/ and publish/ read the method; nothing of the method or of plumbing/ reads them. The
    top level holds the method and what it reads: at most 15 files."""
    for module in modules():
        if module.split(".")[0] not in ("bench", "publish"):
            roots = {name.split(".")[0] for name in imports(module)}
            assert not roots & {"bench", "publish"}, f"{module} imports {roots & {'bench', 'publish'}}"
    assert len([m for m in modules() if "." not in m]) <= 15


def test_the_papers_file_reads_no_hugging_face_folder_and_has_no_lambda():
    """mpo.py, the paper's file, reads no model from a Hugging Face folder itself: a reward model
    or a critic from a folder reaches it through the stage that loads it (stages.py)."""
    assert not project_imports("mpo") & {"plumbing.hf", "plumbing.hf_reward", "plumbing.chat"}
    assert "lambda" not in {type(n).__name__.lower() for n in ast.walk(ast.parse(open(path_of("mpo")).read()))}


def test_trl_is_imported_by_bench_anchors_alone():
    """TRL, accelerate and datasets are optional anchors of the benchmark: bench/anchors.py imports
    them in a process of its own (bench/figures.py runs it), and imports no module of the project."""
    for module in {m for layer in LAYERS for m in layer} - {"bench.anchors"}:
        roots = {name.split(".")[0] for name in imports(module)}
        assert not roots & ANCHOR_PACKAGES, f"{module} imports {roots & ANCHOR_PACKAGES}"
    assert not project_imports("bench.anchors")


def project_trees():
    return {m: ast.parse(open(path_of(m)).read()) for m in MODULES}


def test_every_flag_is_declared_by_checks_setting():
    """One way to declare a setting, its help and its range: checks.setting. No field of a config
    dataclass carries metadata of its own making."""
    for module, tree in project_trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and any(k.arg == "metadata" for k in node.keywords):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                assert name != "field" or module == "plumbing.checks", f"{path_of(module)}:{node.lineno} declares a field's metadata"


def test_no_module_sets_another_modules_globals():
    """Settings travel in the config or the training.Runtime that needs them: nothing assigns a
    global of another module of the project (train.main once set training.COMPILE and kin). A
    benchmark may patch one for a measurement and set it back (bench/compile.py: packing.ALIGN)."""
    for module, tree in project_trees().items():
        if module.startswith("bench"):
            continue
        whole = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names if a.name in MODULES}  # imported whole: import training
        whole |= {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  for a in node.names if f"{node.module}.{a.name}" in MODULES}  # from plumbing import runs
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in [e for target in targets for e in ast.walk(target)]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in whole:
                    raise AssertionError(f"{path_of(module)}:{node.lineno} sets {t.value.id}.{t.attr}")


def test_bench_shapes_are_the_presets():
    """bench/figures.py keeps its own table of the presets' model shapes rather than import train.py, the
    command line; the table must not drift from train.PRESETS."""
    assert "train" not in project_imports("bench.figures")
    for name, shape in bench.SHAPES.items():
        preset = train.PRESETS[name]
        assert shape == {k: getattr(preset, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                         "vocab_size")}, name


def test_stage_configs_hold_hyperparameters_only():
    """What a method trains on, starts from, is referenced to and splits on lives in METHODS alone."""
    recipe_fields = {"pairs", "prompts", "init", "reference", "gap", "budget"}
    for cls in train.STAGE_CONFIGS.values():
        assert not recipe_fields & {f for f in cls.__dataclass_fields__}, cls.__name__
    for flag in ("--ppo-reference", "--gap", "--dpo-pairs"):
        with pytest.raises(SystemExit):
            train.parse_args([flag, "sft"])


def test_every_method_row_is_a_recipe():
    """Each row builds stages; a stage name means one recipe whichever method builds it; ablations
    are the rows named so, and a run's methods come from roles."""
    assert ABLATIONS == [m for m, row in METHODS.items() if row.role == "ablation"]
    assert set(ABLATIONS) >= {"no_selection", "reversed", "random_split", "mpo_ref_sft", "ppo_hard",
                              "dpo_then_ppo_all", "dpo_then_dpo_hard", "abs_gap", "gold_split"}
    finals, recipes = {}, {}
    for name, row in METHODS.items():
        stages, final = method_stages(name)
        assert len(row.folders) == len(row.steps), f"{name}: one folder per step"
        assert [(kind, recipe["subset"]) for _, kind, recipe in stages] == [tuple(s.split()) for s in row.steps]
        for stage, kind, recipe in stages:
            assert recipes.setdefault(stage, (kind, recipe)) == (kind, recipe), f"{stage} means two recipes"
        finals.setdefault(final, name)
        assert finals[final] == name or name == "sft", f"{name} and {finals[final]} share a final stage"
    (_, _, dpo), (_, _, ppo) = method_stages("mpo")[0]
    assert dpo == {"kind": "dpo", "subset": "easy", "init": "sft", "reference": "sft", "split": "split"}
    assert ppo == {"kind": "ppo", "subset": "hard", "init": "dpo", "reference": "dpo", "split": "split", "budget": "pool"}
    assert method_stages("mpo_ref_sft")[0][1][2]["reference"] == "sft"
    assert method_stages("dpo_then_dpo_hard")[0][1][2] == {**dpo, "subset": "hard", "init": "dpo", "reference": "dpo"}
    assert method_stages("gold_split")[0][0][0] == "dpo_gold" and method_stages("abs_gap")[0][0][2]["split"] == "split_abs"
    assert method_stages("ppo_matched")[0][0][2]["budget"] == "mpo"
    assert train.parse_args(["--compare", "--ablations", "all"]).methods == ["mpo_stage1", "mpo", *BASELINES, *ABLATIONS]


def test_gold_split_needs_the_builtin_task(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", str(data), "--ablations", "gold_split"])
    assert e.value.code == 2 and "gold_split" in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_stops_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live run
    try:
        (out / "lock").write_text(str(holder.pid))
        with pytest.raises(SystemExit) as info:
            train.main(["--preset", "micro", "--out", str(out)])
    finally:
        holder.kill()
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"{out} is in use by another run (process {holder.pid})" in err
    assert os.listdir(out) == ["lock"]  # nothing written, the holder's lock left alone


def test_a_crashed_runs_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text(str(dead.pid))
    with locked(str(tmp_path)):
        assert (tmp_path / "lock").read_text() == str(os.getpid())
    assert not (tmp_path / "lock").exists()
    with pytest.raises(StageError):  # a live holder is respected
        (tmp_path / "lock").write_text(str(os.getppid()))
        with locked(str(tmp_path)):
            pass


def test_a_lock_with_our_own_pid_is_ours(tmp_path):
    """A restarted run can get the pid its killed predecessor had (pid 1 in a container)."""
    (tmp_path / "lock").write_text(str(os.getpid()))
    with locked(str(tmp_path)):
        pass


def test_every_user_error_derives_from_one_base():
    """train.py catches one class, data.UserError, for a one-line error and status 2."""
    from plumbing.checkpoint import CheckpointError
    from plumbing.files import DataError, UserError
    from mpo import SplitError
    from training import NonFiniteError
    assert all(issubclass(e, UserError) for e in (DataError, CheckpointError, SplitError, StageError))
    assert not issubclass(NonFiniteError, UserError)  # training diverged: status 3, not the user's input
