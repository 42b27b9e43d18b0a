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
"""
import torch


def pack(idx, attention_mask, position_ids=None, cache=None):
    """idx and attention_mask (B, S) -> (idx, attention_mask, position_ids, unpack) for the model's
    body: packed rows (R, T), their mask (R, 1, T, T) and positions (R, T), and unpack, which takes
    an output (R, T, ...) back to (B, S, ...).

    Unchanged, with unpack the identity: with a cache or given positions, without padding, when a
    row's real tokens are not one run (left padding, the row, right padding), or when packing would
    not save positions.
    """
    unchanged = idx, attention_mask, position_ids, lambda x: x
    if cache is not None or position_ids is not None or attention_mask is None or attention_mask.dim() != 2:
        return unchanged
    B, S = attention_mask.shape
    real = attention_mask.bool()
    lengths, starts = real.sum(1), real.long().argmax(1)
    cols = torch.arange(S, device=idx.device)
    offset = cols - starts[:, None]  # a real token's position in its row
    if not torch.equal(real, (offset >= 0) & (offset < lengths[:, None])):
        return unchanged
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
