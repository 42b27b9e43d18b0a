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

On CUDA a padded batch is aligned instead (align_plan): each row's real tokens moved to the start of
the row, right padding alone, so that plain causal attention without a mask computes every real
token exactly as the masked row does, and SDPA can take its flash kernel: no T x T mask is made,
and the padding's positions cost less there than a masked kernel's tiles. Both layouts give the
padded batch's outputs (tests/test_packing.py).
"""
from typing import NamedTuple

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


class Plan(NamedTuple):
    """Where every token of a padded batch goes, made on the host from its mask (plan): applying it
    on the device (pack) reads nothing back. kind "same" (run as it is), "pack" or "align"; T the
    rows' length; source: where each packed or aligned token is read from in the flat (B S + 1)
    ids (B S: a padding slot's 0); positions (R, T) or (B, T); document (R, T), 0 on the packed
    rows' own padding ("pack" alone); back (B, S): where unpack reads each (b, s) from."""
    kind: str
    T: int = 0
    source: torch.Tensor = None
    positions: torch.Tensor = None
    document: torch.Tensor = None
    back: torch.Tensor = None

    def to(self, device):
        """The plan on `device`: from pinned memory, without blocking the host (on CUDA)."""
        return self._replace(**{k: to_device(v, device) for k, v in self._asdict().items() if torch.is_tensor(v)})


def to_device(t, device):
    """A host tensor on `device`. On CUDA it is pinned first, so that the copy is asynchronous
    (non_blocking): the host goes on queueing work instead of waiting for the copy."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def positions(mask):
    """The flat positions (M,) of a boolean mask's Trues, in order. Its size is the mask's count, so
    on a GPU the host waits for it: where the mask is known on the host (a collated batch), find
    them there (data.to_device)."""
    return mask.flatten().nonzero().squeeze(1)


def aligned(device):
    return ALIGN or (ALIGN is None and torch.device(device).type == "cuda")


def plan(attention_mask, device="cpu"):
    """The packing (or, on CUDA, the alignment) of a padded batch, from its mask (B, S) where it
    lies: on the host, where collate made it, every size it needs is read there and nothing from
    the device. "same" when a row's real tokens are not one run or packing would not save
    positions."""
    found = rows(attention_mask) if attention_mask.dim() == 2 else None
    if found is None:
        return Plan("same")
    lengths, offset = found
    B, S = attention_mask.shape
    if aligned(device):
        return align_plan(attention_mask, -(-int(lengths.max()) // 8) * 8)
    real = attention_mask.bool()
    row_of, at = first_fit(lengths.tolist())
    R, T = max(row_of) + 1, int(lengths.max())
    if T == 0 or R * T >= B * S:
        return Plan("same")
    base = torch.tensor(row_of, device=real.device) * T + torch.tensor(at, device=real.device)
    # where each (b, s) is read from: its own token's slot, or for padding its row's nearest real one
    back = base[:, None] + offset.clamp(min=0).minimum(lengths[:, None] - 1)
    source = torch.full((R * T,), B * S, dtype=torch.long, device=real.device)  # B S: the zero after the ids
    positions = torch.zeros(R * T, dtype=torch.long, device=real.device)
    document = torch.zeros(R * T, dtype=torch.long, device=real.device)  # 0: packed rows' own padding
    source[back[real]] = torch.arange(B * S, device=real.device).view(B, S)[real]
    positions[back[real]] = offset[real]
    document[back[real]] = torch.arange(1, B + 1, device=real.device)[:, None].expand(B, S)[real]
    return Plan("pack", T, source, positions.view(R, T), document.view(R, T), back)


def pack(idx, attention_mask, position_ids=None, cache=None, planned=None):
    """idx and attention_mask (B, S) -> (idx, attention_mask, position_ids, unpack) for the model's
    body: packed rows (R, T), their mask (R, 1, T, T) and positions (R, T), and unpack, which takes
    an output (R, T, ...) back to (B, S, ...); on CUDA (or with ALIGN) aligned rows instead (align_plan).
    planned: the batch's Plan, made on the host (plan); without it, the rows are aligned on the
    device (align_plan, reading nothing back) or a plan is made here from the mask, reading its sizes.

    Unchanged, with unpack the identity: with a cache or given positions, without padding, when a
    row's real tokens are not one run, or when packing would not save positions.
    """
    unchanged = idx, attention_mask, position_ids, lambda x: x
    if cache is not None or position_ids is not None or attention_mask is None or attention_mask.dim() != 2:
        return unchanged
    if planned is None and aligned(idx.device):  # no plan: aligned on the device, nothing read back
        planned = align_plan(attention_mask, -(-idx.size(1) // 8) * 8)
    p = planned or plan(attention_mask, idx.device)
    if p.kind == "same":
        return unchanged
    ids = torch.cat([idx.flatten(), idx.new_zeros(1)])[p.source]  # padding slots: id 0
    if p.kind == "align":
        batch = torch.arange(len(idx), device=idx.device)[:, None]
        return ids, None, p.positions, lambda x: x[batch, p.back]
    R, T = p.document.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = (p.document[:, :, None] == p.document[:, None, :]) & causal  # padding sees padding: never NaN
    unpack = lambda x: x.flatten(0, 1)[p.back]
    return ids.view(R, T), mask[:, None], p.positions, unpack


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


def align_plan(attention_mask, T):
    """Padded rows (B, S) -> the Plan that aligns them into (B, T): each row's real tokens moved, in
    order, to the start of its row, T a multiple of 8 (shapes that compile well) and at least the
    longest row, no mask (plain causal attention), and unpack taking an output (B, T, ...) back to
    (B, S, ...), a padding position holding a copy of a real one of its row. Made on the host from
    the longest row (plan), or on the device from the batch's width (pack without a plan): there no
    value is read back and no shape comes from the data, so under torch.compile the forward stays
    one graph (bench/figures.py --figures graphs), the columns that are padding in every row computed."""
    B, S = attention_mask.shape
    real = attention_mask.bool()
    rank = real.long().cumsum(1) - 1  # a real token's column in its aligned row
    order = torch.sort((~real).long(), dim=1, stable=True).indices[:, :T]  # the real columns first, in order
    source = F.pad(torch.arange(B, device=real.device)[:, None] * S + order, (0, T - order.size(1)), value=B * S)
    positions = torch.arange(T, device=real.device).clamp(max=max(S - 1, 0))[None].expand(B, T)  # real: their rank
    return Plan("align", T, source, positions, None, rank.clamp(min=0))
