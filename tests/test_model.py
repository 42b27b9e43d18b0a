"""The GPT: KV cache, left padding, sampling, heads, optimizer groups, checkpoints, precision; the
sequence log-probs, SFT loss and KL estimators against hand computations."""
import math

import pytest
import torch

from plumbing.checkpoint import load_checkpoint, save_checkpoint
from model import GPT, GPTConfig, ScalarModel, kl_penalty, response_token_logps, sft_loss
from sampling import generate, response_mask
from tolerance import assert_exact
from training import NonFiniteError, autocast, grad_scaler, optimizer_step

CFG = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_kv_cache_matches_full_forward(model):
    """Feeding tokens one at a time through the cache gives the logits of one full pass."""
    from sampling import KVCache
    model.double()  # exact in float64 (tolerance.py): a step sums over the cache in another order
    idx = torch.randint(0, 97, (3, 12))
    full = model(idx)
    cache = KVCache(CFG, 3, 12, "cpu", torch.float64)
    steps = [model(idx[:, :5], cache=cache)]  # a prefill of 5, then single tokens
    steps += [model(idx[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert_exact(torch.cat(steps, 1), full)


def test_kv_cache_with_left_padding(model):
    """Incremental decoding of a left-padded row equals a full pass over its real tokens."""
    from sampling import KVCache
    model.double()  # exact in float64 (tolerance.py)
    real = torch.randint(0, 97, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    cache = KVCache(CFG, 1, 12, "cpu", torch.float64)
    out = [model(padded[:, :7], mask[:, :7], cache=cache)[:, 3:]]
    for t in range(7, 12):
        out.append(model(padded[:, t:t + 1], mask[:, :t + 1], position_ids=torch.tensor([[t - 3]]), cache=cache))
    assert_exact(torch.cat(out, 1), model(real))


def test_left_padding_invariance(model):
    """A left-padded prompt gives the same logits on its real tokens as the prompt alone."""
    model.double()  # exact in float64 (tolerance.py): the padded rows pack and sum in another order
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 6))
    batch = torch.cat([a, torch.cat([torch.full((1, 4), 5), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model(batch, mask)
    assert_exact(out[0], model(a)[0])
    assert_exact(out[1, 4:], model(b)[0])
    assert torch.isfinite(out).all()  # padding rows too: never an all-masked softmax


def test_generate_reproducible(model):
    """A fixed generator gives the same sample, another generator another one."""
    prompt = torch.randint(0, 97, (4, 5))
    run = lambda: generate(model, prompt, None, 10, temperature=0.7, generator=torch.Generator().manual_seed(3))
    t1, m1 = run()
    t2, m2 = run()
    assert torch.equal(t1, t2) and torch.equal(m1, m2)
    t3, _ = generate(model, prompt, None, 10, temperature=0.7, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(t1, t3)


def test_generate_stops_at_eos_and_masks(model):
    """The mask is 1 up to and including the first eos; tokens after it are padding."""
    prompt = torch.randint(0, 97, (8, 3))
    free, _ = generate(model, prompt, None, 12, top_k=1)  # greedy, no eos
    eos = free[0, 3].item()  # row 0 will stop at step 4 (or earlier); other rows elsewhere
    tokens, mask = generate(model, prompt, None, 12, eos_id=eos, pad_id=0, top_k=1)
    assert (tokens == eos).any()
    for row, m in zip(tokens.tolist(), mask.tolist()):
        n = row.index(eos) + 1 if eos in row else len(row)
        assert m == [1] * n + [0] * (len(row) - n)
        assert all(t == 0 for t in row[n:])
    assert torch.equal(response_mask(torch.tensor([[1, 7, 7, 2]]), 7, 0), torch.tensor([[1, 1, 0, 0]]))


def test_top_k_top_p_restrict_the_sample(model):
    """top_k=1 is greedy; a tiny top_p is greedy too."""
    prompt = torch.randint(0, 97, (3, 4))
    greedy = model(prompt)[:, -1].argmax(-1)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        tokens, _ = generate(model, prompt, None, 1, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(tokens[:, 0], greedy)


def test_scalar_model_shapes_and_backbone(model):
    """The scalar head gives (B, T); a GPT checkpoint loaded as scalar keeps the backbone."""
    head = ScalarModel(CFG)
    x = torch.randint(0, 97, (2, 7))
    assert head(x).shape == (2, 7)


def test_checkpoint_round_trip_and_kinds(model, tmp_path):
    save_checkpoint(model, tmp_path / "gpt", note="hello")
    loaded, info = load_checkpoint(tmp_path / "gpt")
    x = torch.randint(0, 97, (2, 7))
    assert torch.equal(loaded(x), model(x)) and info["note"] == "hello"
    scalar, _ = load_checkpoint(tmp_path / "gpt", kind="scalar")
    assert torch.equal(scalar.gpt(x, hidden=True), model(x, hidden=True))
    save_checkpoint(scalar, tmp_path / "rm", reward_offset=1.5)
    back, info = load_checkpoint(tmp_path / "rm", kind="gpt")
    assert torch.equal(back(x), model(x)) and info["reward_offset"] == 1.5
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_checkpoint_shape_mismatch_is_a_clear_error(model, tmp_path):
    import json
    save_checkpoint(model, tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    info["model"]["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="shapes do not match"):
        load_checkpoint(tmp_path)


def test_weight_decay_groups(model):
    """Decay on matrices only: not on biases, LayerNorms or embeddings."""
    opt = model.configure_optimizers(1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert "transformer.h.0.attn.c_attn.weight" in decay
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.bias"} <= no_decay
    assert not decay & no_decay and len(decay | no_decay) == len(list(model.parameters()))


def test_bf16_autocast_on_cpu(model):
    """The precision plumbing runs on the CPU: bf16 autocast forward and a training step."""
    model.train()
    opt = model.configure_optimizers(1e-2)
    x = torch.randint(0, 97, (2, 8))
    with autocast("cpu", "bf16"):
        logits = model(x)
        assert model.transformer.h[0].mlp.c_fc(torch.randn(2, model.config.n_embd)).dtype == torch.bfloat16
    assert logits.dtype == torch.float32  # the body in bf16, the vocabulary projection in float32
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, 97), x.view(-1))
    optimizer_step(loss, opt, 1.0)
    assert model.transformer.wte.weight.dtype == torch.float32  # master weights stay fp32


def test_fp16_scaler_skips_a_step_with_inf_gradients():
    """With fp16 loss scaling, an overflowing gradient skips the step instead of corrupting weights."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3 on the CPU")
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = grad_scaler("cpu", "fp16")
    before = p.detach().clone()
    loss = (p * torch.tensor([1.0, 3e38, 1.0])).sum()  # finite loss, inf once scaled by 65536
    optimizer_step(loss, opt, 1.0, scaler)
    assert torch.equal(p.detach(), before)
    assert scaler.get_scale() < 65536.0  # the scale backed off


def test_non_finite_loss_stops():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(NonFiniteError, match="step 7"):
        optimizer_step(p.sum() * float("nan"), opt, 1.0, step=7)


# ----------------------------------------------------------------------------- log-probs: precision and positions

def large_logits_model():
    """The tiny preset's shape, its final norm's gain raised so that the logits spread like a trained
    model's (standard deviation about 7, the largest about 60) rather than a random init's (0.2)."""
    from model import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, block_size=128, n_layer=2, n_head=4, n_embd=128)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(30.0)
    seq = torch.randint(0, 1024, (16, 80), generator=torch.Generator().manual_seed(1))
    return model, seq, torch.ones_like(seq), 32


def test_the_vocabulary_projection_runs_in_float32_under_autocast():
    """Under bf16 autocast the body runs in bf16 but the logits are the float32 projection of its
    hidden states, so no logit is rounded to bf16 before the log-softmax."""
    model, seq, attn, P = large_logits_model()
    with torch.no_grad(), autocast("cpu", "bf16"):
        logits = model(seq, attn, logits_from=P)
        hidden = model(seq, attn, hidden=True)[:, P:]
    assert logits.dtype == torch.float32
    assert torch.equal(logits, hidden.float() @ model.lm_head.weight.t())


def test_bf16_log_probs_stay_close_to_float32():
    """|log p under bf16 autocast - log p in float32| per response token, at logits of a trained
    model's size: the bf16 body alone costs mean 0.028 and max 0.12 nat here; rounding the logits
    to bf16 as well (the projection under autocast) cost mean 0.057 and max 0.27."""
    from model import response_logprobs
    model, seq, attn, P = large_logits_model()
    with torch.no_grad():
        exact, _ = response_logprobs(model, seq, attn, P)
        with autocast("cpu", "bf16"):
            mixed, _ = response_logprobs(model, seq, attn, P)
    error = (mixed - exact).abs()
    assert error.mean() < 0.04 and error.max() < 0.2, (error.mean(), error.max())


def test_logits_only_where_scored_equal_the_full_projection(model):
    """Projecting only the positions that predict a response token (SFT, DPO) or from the response
    on (PPO, the evaluation) gives the log-probs of the full projection, up to float order."""
    import data
    from model import response_logprobs, token_logprobs
    batch = data.collate([[3, 4, 5, 6], [7], [8, 9]], [[10, 11, 1], [12, 13, 14, 15, 1], [16, 1]], pad_id=0)
    ids, mask = batch["input_ids"], batch["response_mask"]
    model.double()  # exact in float64 (tolerance.py): fewer positions projected, other sums
    with torch.no_grad():
        full = token_logprobs(model(ids, batch["attention_mask"])[:, :-1], ids[:, 1:]) * mask[:, 1:]
        cut = response_token_logps(model, batch)
        lp, _ = response_logprobs(model, ids, batch["attention_mask"], 4)
        only, entropy = response_logprobs(model, ids, batch["attention_mask"], 4, mask=mask[:, 4:], entropy=True)
    assert_exact(cut[:, 1:], full)
    assert_exact(only, lp * mask[:, 4:])
    assert torch.equal(entropy > 0, mask[:, 4:].bool())  # with the mask: the response tokens' only
    assert torch.equal(cut != 0, mask.bool())  # a log-prob at each response token, nowhere else
    assert_exact((lp * mask[:, 4:]).sum(-1), full.sum(-1))


def test_categorical_samples_by_the_probabilities():
    """The exponential race with E = -log U draws each index with its probability."""
    from sampling import categorical
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0]]).expand(200000, 4)
    drawn = categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert torch.allclose(freq, probs[0], atol=0.005) and freq[3] == 0


# ----------------------------------------------------------------------------- log-probs, SFT loss and KL by hand


# rows: left pad + prompt + response + right pad; the mask is 1 on response tokens only
SEQ_MASK = torch.tensor([
    [0, 0, 0, 0, 1, 1, 1, 0],  # pad pad p p r r r pad
    [0, 0, 1, 1, 0, 0, 0, 0],  # pad p r r pad pad pad pad
    [0, 0, 0, 1, 1, 1, 1, 1],  # p p p r r r r r (no padding)
])


def brute_sequence_logps(logits, labels, mask):
    """Sum over t with mask[t] = 1 of log_softmax(logits[t - 1])[labels[t]], with python math."""
    out = []
    for b in range(logits.size(0)):
        total = 0.0
        for t in range(1, logits.size(1)):
            if mask[b, t]:
                row = logits[b, t - 1].tolist()
                total += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row))
        out.append(total)
    return out


def seq_inputs():
    torch.manual_seed(2)
    return torch.randn(3, 8, 5), torch.randint(0, 5, (3, 8))


def given_logits(logits):
    """A stand-in model whose logits are given: its hidden states are the logits, at the positions
    response_token_logps asks for, and its vocabulary projection the identity."""
    from model import projected, scored_logps
    return lambda ids, attention_mask, logits_from, targets, plan=None, **kw: scored_logps(
        projected(logits, logits_from), torch.eye(logits.size(-1)), targets, **kw)


def logps_of(logits, labels):
    return response_token_logps(given_logits(logits), {"input_ids": labels, "attention_mask": None,
                                                       "response_mask": SEQ_MASK})


def test_response_token_logps_match_brute_force():
    """Summed over a row, the next-token log-probs of the response tokens only."""
    logits, labels = seq_inputs()
    got = logps_of(logits, labels).sum(-1)
    assert got.tolist() == pytest.approx(brute_sequence_logps(logits, labels, SEQ_MASK), rel=1e-5)


def test_response_token_logps_ignore_prompt_labels():
    """Changing a prompt or pad token's id leaves the result unchanged; a response token's does not."""
    logits, labels = seq_inputs()
    base = logps_of(logits, labels)
    changed = labels.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 5  # prompt token of row 0
    changed[1, 1] = (changed[1, 1] + 1) % 5  # prompt token of row 1
    changed[0, 7] = (changed[0, 7] + 1) % 5  # right pad of row 0
    assert torch.equal(logps_of(logits, changed), base)
    changed[0, 5] = (changed[0, 5] + 1) % 5  # a response token of row 0
    assert logps_of(logits, changed)[0].sum() != base[0].sum()


def test_sft_loss_is_the_mean_token_nll():
    """sft_loss = -(sum of response-token log-probs) / (number of response tokens)."""
    logits, labels = seq_inputs()
    n = SEQ_MASK[:, 1:].sum().item()
    assert sft_loss(logps_of(logits, labels), SEQ_MASK).item() == pytest.approx(
        -sum(brute_sequence_logps(logits, labels, SEQ_MASK)) / n, rel=1e-5)


def test_kl_penalty_estimators_by_hand():
    """k1 = log p - log q; k3 = (q/p - 1) - log(q/p), never negative, 0 where p = q."""
    lp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -2.0, 0.0]])
    assert kl_penalty(lp, ref)[0].tolist() == pytest.approx([0.5, 0.0, -0.5])
    k3 = [(math.exp(r - l) - 1) - (r - l) for l, r in zip(lp[0].tolist(), ref[0].tolist())]
    assert kl_penalty(lp, ref, "k3")[0].tolist() == pytest.approx(k3, rel=1e-6)
    assert (kl_penalty(lp, ref, "k3") >= 0).all() and kl_penalty(lp, ref, "k3")[0, 1] == 0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k2")


def test_kl_penalty_estimates_the_true_kl():
    """Both estimators average to KL(p || q) over samples of p (a 3-way categorical)."""
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    y = torch.multinomial(p, 200000, replacement=True, generator=torch.Generator().manual_seed(0))
    true = (p * (p / q).log()).sum().item()
    for estimator in ("k1", "k3"):
        assert kl_penalty(p.log()[y], q.log()[y], estimator).mean().item() == pytest.approx(true, abs=0.01)


def test_response_logprobs_agree_with_response_token_logps():
    """The PPO/evaluation path (left-padded prompt + response, logits at the temperature) and the
    DPO/SFT path (response_token_logps over the response mask) give the same log pi(y | x)."""
    import data
    from model import GPT, GPTConfig, response_logprobs
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval().double()  # exact in float64
    batch = data.collate([[3, 4, 5], [6]], [[7, 8, 9, 1], [10, 1]], pad_id=0)
    P = 3
    with torch.no_grad():
        token_lp, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], P)
        per_row = (token_lp * batch["response_mask"][:, P:]).sum(-1)
        assert_exact(per_row, response_token_logps(model, batch).sum(-1))


# ----------------------------------------------------------------------------- memory: checkpointing, chunked log-probs

def memory_models():
    """Both layouts in float64: exact (tolerance.py), as recomputed blocks and chunks sum in other orders."""
    from llama import Llama, LlamaConfig
    torch.manual_seed(0)
    return {"gpt": GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16)).double(),
            "llama": Llama(LlamaConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                                       intermediate_size=24, tie_word_embeddings=False)).double()}


def loss_and_gradients(model, entropy=False):
    """The SFT loss of a padded batch (left and right padding: the packed path) and its gradients."""
    import data
    from model import logps_at, positions
    batch = data.collate([[3, 4, 5, 6], [7], [8, 9]], [[10, 11, 1], [12, 13, 14, 15, 1], [16, 1]], pad_id=0)
    model.zero_grad()
    mask = batch["response_mask"].bool().clone()
    mask[:, 0] = False
    logps, entropies = logps_at(model, batch["input_ids"], batch["attention_mask"], positions(mask), 0.7, entropy)
    loss = sft_loss(logps, batch["response_mask"])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], entropies


@pytest.mark.parametrize("layout", ["gpt", "llama"])
def test_checkpointed_blocks_give_the_plain_loss_and_gradients(layout):
    from model import set_checkpointing
    model = memory_models()[layout].train()
    loss, grads, _ = loss_and_gradients(model)
    set_checkpointing(model)
    assert all(m.checkpointing for m in model.modules() if hasattr(m, "checkpointing"))
    loss_c, grads_c, _ = loss_and_gradients(model)
    assert_exact(loss_c, loss)
    for g, gc in zip(grads, grads_c):
        assert_exact(gc, g)


@pytest.mark.parametrize("layout", ["gpt", "llama"])
def test_chunked_log_probs_give_the_plain_loss_gradients_and_entropies(layout, monkeypatch):
    """Logits made in chunks of 2 positions, each recomputed in the backward pass, against one chunk
    (the plain path): the same loss, gradients and entropies to float order."""
    import model as model_module
    net = memory_models()[layout].train()
    loss, grads, entropies = loss_and_gradients(net, entropy=True)
    monkeypatch.setattr(model_module, "LOGIT_CHUNK_BYTES", 2 * 4 * 97)  # 2 positions of 97 float32 logits
    calls = []
    chunk = model_module.chunk_logps
    monkeypatch.setattr(model_module, "chunk_logps", lambda *a: calls.append(a[0].size(0)) or chunk(*a))
    loss_c, grads_c, entropies_c = loss_and_gradients(net, entropy=True)
    assert max(calls) == 2 and sum(calls) > 10  # in chunks, each run again in the backward pass
    assert_exact(loss_c, loss)
    assert_exact(entropies_c, entropies)
    for g, gc in zip(grads, grads_c):
        assert_exact(gc, g)


def test_the_entropy_is_that_of_the_sampling_distribution():
    """scored_logps' entropy, -sum pi log pi of softmax(logits / temperature), by hand."""
    from model import scored_logps
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    logps, entropy = scored_logps(logits, torch.eye(3), torch.tensor([1, 2]), temperature=2.0, entropy=True)
    pi = (logits / 2).softmax(-1)
    torch.testing.assert_close(entropy, -(pi * pi.log()).sum(-1))
    torch.testing.assert_close(logps, pi[[0, 1], [1, 2]].log())
