"""Packed rows: a padded batch's real tokens laid end to end in fewer rows, so that a forward pass
spends (almost) nothing on padding. The built-in task's batches are 40% padding and more: prompts
are left-padded to the longest prompt and responses right-padded to the longest response, and both
vary. GPT.forward and Llama.forward pack every padded batch they run without a KV cache (SFT, the
reward model, DPO, PPO's scoring and update); sampling with a cache runs as it is.

Each row keeps its real tokens' positions and attends only to its own earlier tokens (a
block-diagonal causal mask), so the output at every real token is the padded row's; unpack lays the
outputs back out as (B, S, ...), a padding position holding a copy of a real one of its row, which
every loss, reward and value masks out. The packed mask is (R, 1, T, T) and never the fused causal
kernel, which padded batches could not take either.

On CUDA a padded batch is aligned instead (align): each row's real tokens moved to the start of
the row, right padding alone, so that plain causal attention without a mask computes every real
token exactly as the masked row does, and SDPA can take its flash kernel: no T x T mask is made,
and the padding's positions cost less there than a masked kernel's tiles. Both layouts give the
padded batch's outputs (tests/test_packing.py).
"""
import torch
import torch.nn.functional as F

ALIGN = None  # None: align on CUDA, pack elsewhere; True or False: one or the other anywhere (tests)


def rows(attention_mask):
    """Each row's real tokens as one run: (lengths (B,), offset (B, S): a token's place in its run),
    or None when some row's real tokens are not one run (left padding, the row, right padding)."""
    real = attention_mask.bool()
    lengths, starts = real.sum(1), real.long().argmax(1)
    offset = torch.arange(real.size(1), device=real.device) - starts[:, None]
    if not torch.equal(real, (offset >= 0) & (offset < lengths[:, None])):
        return None
    return lengths, offset


def pack(idx, attention_mask, position_ids=None, cache=None):
    """idx and attention_mask (B, S) -> (idx, attention_mask, position_ids, unpack) for the model's
    body: packed rows (R, T), their mask (R, 1, T, T) and positions (R, T), and unpack, which takes
    an output (R, T, ...) back to (B, S, ...); on CUDA (or with ALIGN) aligned rows instead (align).

    Unchanged, with unpack the identity: with a cache or given positions, without padding, when a
    row's real tokens are not one run, or when packing would not save positions.
    """
    unchanged = idx, attention_mask, position_ids, lambda x: x
    if cache is not None or position_ids is not None or attention_mask is None or attention_mask.dim() != 2:
        return unchanged
    if ALIGN or (ALIGN is None and idx.is_cuda):
        return align(idx, attention_mask)
    found = rows(attention_mask)
    if found is None:
        return unchanged
    lengths, offset = found
    B, S = attention_mask.shape
    real = attention_mask.bool()
    row_of, at = first_fit(lengths.tolist())
    R, T = max(row_of) + 1, int(lengths.max())
    if T == 0 or R * T >= B * S:
        return unchanged
    base = torch.tensor(row_of, device=idx.device) * T + torch.tensor(at, device=idx.device)
    # where each (b, s) is read from: its own token's slot, or for padding its row's nearest real one
    index = base[:, None] + offset.clamp(min=0).minimum(lengths[:, None] - 1)
    ids = torch.zeros(R * T, dtype=idx.dtype, device=idx.device)
    positions = torch.zeros(R * T, dtype=torch.long, device=idx.device)
    document = torch.zeros(R * T, dtype=torch.long, device=idx.device)  # 0: packed rows' own padding
    ids[index[real]], positions[index[real]] = idx[real], offset[real]
    document[index[real]] = torch.arange(1, B + 1, device=idx.device)[:, None].expand(B, S)[real]
    document = document.view(R, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = (document[:, :, None] == document[:, None, :]) & causal  # padding sees padding: never NaN
    unpack = lambda x: x.flatten(0, 1)[index]
    return ids.view(R, T), mask[:, None], positions.view(R, T), unpack


def first_fit(lengths):
    """Rows of at most max(lengths) tokens: each sequence, longest first, goes into the first row with
    room. -> (row of each sequence, its first column there)."""
    T = max(lengths)
    room, row_of, at = [], [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), len(room))
        if r == len(room):
            room.append(T)
        row_of[i], at[i] = r, T - room[r]
        room[r] -= lengths[i]
    return row_of, at


def align(idx, attention_mask):
    """Padded rows (B, S) -> (idx (B, T), None, positions (B, T), unpack): each row's real tokens
    moved, in order, to the start of its row, T = S rounded up to a multiple of 8 (shapes that
    compile well), no mask (plain causal attention), and unpack taking an output (B, T, ...) back to
    (B, S, ...), a padding position holding a copy of a real one of its row. No host read and no
    shape from the data: under torch.compile the forward stays one graph (bench.py --figures graphs);
    the columns that are padding in every row are computed, which trimming them would need a host
    read to avoid."""
    B, S = idx.shape
    T = -(-S // 8) * 8
    real = attention_mask.bool()
    rank = real.long().cumsum(1) - 1  # a real token's column in its aligned row
    source = torch.sort((~real).long(), dim=1, stable=True).indices  # the real columns first, in order
    ids = F.pad(idx.gather(1, source), (0, T - S), value=0)
    positions = torch.arange(T, device=idx.device).clamp(max=max(S - 1, 0))[None].expand(B, T)  # real: their rank
    batch = torch.arange(B, device=idx.device)[:, None]
    return ids, None, positions, lambda x: x[batch, rank.clamp(min=0)]
