"""Packed rows (plumbing/packing.py): a padded batch's outputs and gradients at every real token are each
row's alone, for both layouts and the scalar heads, in fewer positions."""
import contextlib

import pytest
import torch

import data
from cuda_like import fused_sdpa_layout
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig, ScalarModel
from plumbing.packing import first_fit, pack
from tolerance import assert_exact

V = 61
LAYOUTS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=2, n_head=2, n_embd=16)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_embd=16, n_kv_head=2,
                                       intermediate_size=24, tie_word_embeddings=False)),
}


def padded_batch(n, seed=0):
    """data.collate's layout: prompts left-padded, responses right-padded, lengths drawn at random."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(2, V, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()
    return data.collate([draw(2, 12) for _ in range(n)], [draw(1, 20) for _ in range(n)], pad_id=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_packed_batch_gives_each_rows_own_outputs_and_gradients(layout):
    torch.manual_seed(0)
    model = LAYOUTS[layout]().double()  # exact in float64 (tolerance.py): the rows sum in other orders
    batch = padded_batch(12)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packed_ids, _, _, _ = pack(ids, mask)
    assert packed_ids.numel() < 0.8 * ids.numel()  # it packs: fewer positions
    weights = torch.randn(*ids.shape, V, dtype=torch.float64)
    logits = model(ids, mask)
    (logits * weights * mask[..., None]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for b in range(len(ids)):  # each row alone, without padding: no mask, no packing
        real = mask[b].bool()
        alone = model(ids[b, real][None])[0]
        assert_exact(logits[b, real], alone)
        (alone * weights[b, real]).sum().backward()
    for p, g in zip(model.parameters(), grads):
        assert_exact(p.grad, g)


def test_the_reward_at_the_last_token_is_each_rows_own():
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(vocab_size=V, block_size=40, n_layer=2, n_head=2, n_embd=16)).eval().double()
    batch = padded_batch(9, seed=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    values = rm(ids, mask)
    for b in range(len(ids)):
        real = mask[b].bool()
        assert_exact(values[b, real], rm(ids[b, real][None])[0])  # exact in float64 (tolerance.py)


def test_batches_it_cannot_or_need_not_pack_run_as_they_are():
    ids = torch.randint(0, V, (3, 8))
    gaps = torch.tensor([[1, 1, 0, 1, 1, 0, 0, 0]] * 3)  # real tokens in two runs
    full = torch.ones(3, 8, dtype=torch.long)
    for mask in (gaps, full, None):
        out_ids, out_mask, positions, unpack = pack(ids, mask)
        assert out_ids is ids and out_mask is mask and positions is None and unpack(ids) is ids


def test_first_fit_fills_rows_longest_first_without_overflow():
    lengths = [7, 3, 5, 2, 7, 1, 4]
    row_of, at = first_fit(lengths)
    assert row_of == [0, 3, 2, 2, 1, 4, 3]  # rows 7 | 7 | 5 + 2 | 4 + 3 | 1, the longest placed first
    for r in set(row_of):
        spans = sorted((at[i], at[i] + lengths[i]) for i in range(len(lengths)) if row_of[i] == r)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= max(lengths)


@pytest.mark.parametrize("padding", ["both", "right", "left", "gaps"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_aligned_rows_give_the_packed_outputs_and_gradients_without_a_mask(layout, padding, monkeypatch):
    """CUDA's layout (packing.align_plan): each row's tokens moved to its start, no mask, so plain causal
    attention (the flash kernel's) runs; every real token's logits and every gradient equal the
    packed path's to float order (in float64), with left, right or both paddings, and the masked rows'
    with padding inside rows too (gaps: not packed)."""
    from plumbing import packing
    torch.manual_seed(0)
    model = LAYOUTS[layout]().double()  # exact in float64 (tolerance.py): aligned and packed rows sum in other orders
    batch = padded_batch(10, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    if padding != "both":  # one side only: the other side's padding becomes real tokens
        mask = torch.ones_like(mask)
        lengths = torch.randint(3, ids.size(1), (len(ids),), generator=torch.Generator().manual_seed(1))
        for b, n in enumerate(lengths):
            if padding == "right":
                mask[b, n:] = 0
            else:
                mask[b, :ids.size(1) - n] = 0
    if padding == "gaps":
        mask[:, ids.size(1) // 2] = 0
    weights = torch.randn(*ids.shape, V, dtype=torch.float64)
    outputs = {}
    for align in (False, True):
        monkeypatch.setattr(packing, "ALIGN", align)
        model.zero_grad()
        logits = model(ids, mask)
        (logits * weights * mask[..., None]).sum().backward()
        outputs[align] = logits[mask.bool()], [p.grad.clone() for p in model.parameters()]
    aligned_ids, aligned_mask, positions, _ = pack(ids, mask)
    assert aligned_mask is None and aligned_ids.size(1) % 8 == 0 and positions.shape == aligned_ids.shape
    assert_exact(outputs[True][0], outputs[False][0])
    for a, b in zip(outputs[True][1], outputs[False][1]):
        assert_exact(a, b)


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_plan_made_on_the_host_gives_the_same_outputs_and_gradients(layout, align, monkeypatch):
    """data.to_device plans the packing (or alignment) where collate made the mask, so the forward
    pass reads nothing back; the outputs and gradients are the unplanned pass's exactly."""
    from plumbing import packing
    monkeypatch.setattr(packing, "ALIGN", align)
    torch.manual_seed(0)
    model = LAYOUTS[layout]()
    batch = padded_batch(10, seed=4)
    weights = torch.randn(*batch["input_ids"].shape, V)
    outputs = []
    for planned in (None, data.to_device(batch, "cpu")["plan"]):
        model.zero_grad()
        logits = model(batch["input_ids"], batch["attention_mask"], plan=planned)
        (logits * weights * batch["attention_mask"][..., None]).sum().backward()
        outputs.append([logits] + [p.grad.clone() for p in model.parameters()])
    assert outputs[1][0].size(1) == batch["input_ids"].size(1) and packing.plan(batch["attention_mask"]).kind != "same"
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", ["causal", "padded", "packed", "aligned"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_forwards_on_cudas_fused_attention_layout_give_the_same_outputs(layout, rows, monkeypatch):
    """SDPA's output in the layout of CUDA's fused kernels (tests/cuda_like.py): the logits and every
    gradient of a training forward are the contiguous output's, for rows without a mask (the fused
    causal path), padded rows run as they are (padding inside rows: a mask, not packed), packed
    rows (a block-diagonal mask) and aligned rows (no mask, CUDA's)."""
    from plumbing import packing
    monkeypatch.setattr(packing, "ALIGN", rows == "aligned")
    torch.manual_seed(0)
    model = LAYOUTS[layout]()
    batch = padded_batch(6, seed=5)
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    if rows == "causal":
        mask = torch.ones_like(mask)
    if rows == "padded":
        mask[:, ids.size(1) // 2] = 0
    weights = torch.randn(*ids.shape, V)
    outputs = []
    for mode in (contextlib.nullcontext, fused_sdpa_layout):
        model.zero_grad()
        with mode() as calls:
            logits = model(ids, None if rows == "causal" else mask)
            (logits * weights * mask[..., None]).sum().backward()
        outputs.append([logits] + [p.grad.clone() for p in model.parameters()])
    assert len(calls) == 2  # both layers' attention ran in the fused layout
    for a, b in zip(*outputs):  # equal here; within float order of their size where a build's kernels sum otherwise
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_aligned_training_forward_is_one_graph_under_compile(layout):
    """CUDA's training forwards (aligned rows: the log-probs of SFT, DPO and PPO, the reward model's
    and critic's hidden states) trace as one graph each under torch.compile's settings
    (training.DYNAMO): align_plan reads nothing from the device, and the scored positions' count is traced.
    Before: 6 graphs per log-probs forward (bench/figures.py --figures graphs)."""
    from bench import compile as bench_compile
    torch.manual_seed(0)
    model = LAYOUTS[layout]()
    for name, (args, kwargs) in bench_compile.forwards(model, padded_batch(6, seed=2)).items():
        for planned in (True, False):  # a stage's batch (data.to_device's plan), or a mask alone
            graphs, breaks = bench_compile.graph_breaks(model, args, kwargs, aligned=True, planned=planned)
            assert graphs == 1 and not breaks, (name, planned, breaks)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "packed"])
def test_batches_of_other_sizes_reuse_the_compiled_training_forward(aligned, monkeypatch):
    """--compile's model (training.compiled) compiles the training forward once for batches of every
    size and length: on CUDA's aligned rows one graph; on the CPU's packed rows one per plan kind
    (packed, or run as it is where packing saves nothing). With duck shaping, a size equal by chance
    to another in the first batch (packed rows and rows) became a guard, and later batches compiled
    the graph again."""
    import torch.fx.experimental._config as shapes
    from torch._dynamo.testing import CompileCounter
    from bench.compile import training_batch
    from model import response_token_logps
    from plumbing import packing
    import training
    counter, compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile(model, backend=counter, **kw))
    monkeypatch.setattr(packing, "ALIGN", aligned)
    with shapes.patch(use_duck_shape=True):  # torch's default, set back after the test
        torch._dynamo.reset()
        torch.manual_seed(0)
        forward = training.compiled(LAYOUTS["gpt"](), True)
        # first, a batch whose sizes coincide: no two rows fit in one (3 packed rows of 3), and the longest
        # prompt and response, 7 + 9, make the padded length 16, the aligned one
        first = data.collate([[5] * 7, [6] * 3, [7] * 6], [[8] * 2, [9] * 9, [10] * 5], pad_id=0)
        kinds = set()
        for seed, rows in enumerate((first, 6, 4, 9, 7, 5, 8, 3)):
            batch = data.to_device(rows if seed == 0 else training_batch(V, rows, seed), "cpu")  # as a stage's: planned
            kinds.add(batch["plan"].kind)
            response_token_logps(forward, batch).sum().backward()
        torch._dynamo.reset()
    assert counter.frame_count == len(kinds) and (kinds == {"align"} if aligned else "pack" in kinds), kinds
