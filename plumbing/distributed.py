"""Data parallelism with torch.distributed, the way nanoGPT runs it: `torchrun --nproc_per_node N
train.py ...` starts N copies of the same program. Each copy is one rank: it holds every model
whole, computes on its share of each global batch, and DDP averages the gradients in backward
(nccl on CUDA, gloo on the CPU). Started without torchrun, every function here is the
single-process identity, so one code path serves both.

Rank 0 alone writes files: data.atomic_write and data.append_jsonl, which every writer uses, and
report._pyplot (the plots) ask is_main().
Every rank reads the same files; the Runner puts a barrier after each stage so that they exist.
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup(device):
    """Join the process group when started by torchrun; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return device
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch.cuda.set_device(device)
    return device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    """Ranks in the job: torchrun's WORLD_SIZE (readable before setup), else 1."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0, the one that writes files and draws progress bars."""
    return rank() == 0


def chunks(items, k):
    """k near-equal contiguous parts of a list, which concatenated give the list back."""
    n = len(items)
    return [items[j * n // k:(j + 1) * n // k] for j in range(k)]


def shard(items):
    """This rank's part of a list: the r-th of W chunks, so the parts in rank order give it back."""
    return chunks(items, world_size())[rank()]


def gather(items):
    """Every rank's list, concatenated in rank order, on every rank (the inverse of shard)."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def total(x):
    """A tensor summed over the ranks (x itself with one rank)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def sum_row(row):
    """A row of logged figures summed over the ranks (the row itself with one rank)."""
    if not dist.is_initialized():
        return row
    values = total(torch.tensor([float(v) for v in row.values()], dtype=torch.float64,
                                device="cuda" if dist.get_backend() == "nccl" else "cpu"))
    return dict(zip(row, values.tolist()))


def broadcast(obj):
    """Rank 0's object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def wrap(model):
    """DDP around a model in training (backward averages its gradients over the ranks), or the
    model itself with one rank. Generation and frozen models use the bare model."""
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
