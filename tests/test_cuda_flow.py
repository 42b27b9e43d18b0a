"""CUDA-only control flow, run on the CPU against stubs of the torch.cuda calls it makes: runs.py
reads the peak memory of the device the run used."""
import json

import torch

from runs import Runner


def test_a_stages_peak_memory_is_read_on_the_device_the_run_used(monkeypatch, tmp_path):
    """A single process on --device cuda:1 allocates on device 1 while device 0 stays current: the
    stage's peak_gib is device 1's."""
    peaks = {0: 0, 1: 3 * 2 ** 30}
    index = lambda device: 0 if device is None else torch.device("cuda", device).index
    for name, fake in [("is_initialized", lambda: True), ("device_count", lambda: 2), ("current_device", lambda: 0),
                       ("reset_peak_memory_stats", lambda device=None: None),
                       ("max_memory_allocated", lambda device=None: peaks[index(device)])]:
        monkeypatch.setattr(torch.cuda, name, fake)
    runner = Runner(str(tmp_path), 0, ["tokenizer"], ["tokenizer"], [], None)
    runner.run("tokenizer", "tokenizer", {}, [], lambda folder: {})
    assert json.loads((tmp_path / "tokenizer" / "done.json").read_text())["peak_gib"] == 3.0
