"""Counting host reads on the CPU: the operations that, run on a GPU, make the host wait for the
device (a tensor's value read back, or an output whose size depends on the values). On the CPU
nothing waits, so the counter looks at the aten operations themselves (a TorchDispatchMode).

    with HostReads() as reads:
        ...
    reads.count, reads.ops      # how many, and which

Counted: .item(), float(t), bool(t), int(t) (aten._local_scalar_dense, under aten.item and
aten.is_nonzero), .tolist() (a copy to the host on a GPU), torch.equal, nonzero and the operations
built on it (masked_select, boolean-mask indexing and index_put, repeat_interleave with a tensor of
counts, unique). host(fn) runs fn uncounted: work that is on the host by construction (collate
building a batch from lists).
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose output size or value the host must read from the device
READS = {aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default, aten.nonzero_static.default,
         aten.masked_select.default, aten.argwhere.default, aten._unique2.default, aten.unique_dim.default,
         aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def boolean_index(func, args):
    """Indexing with a boolean mask runs nonzero on the mask first (the output's size is its count)."""
    return func in INDEXING and any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.marks = [], []  # marks: len(ops) at each mark(), to count reads between them
        self.paused = 0  # inside host(fn)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and (func in READS or boolean_index(func, args)):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        ACTIVE.append(self)
        self.tolist = torch.Tensor.tolist
        reads = self

        def tolist(t):
            if not reads.paused:
                reads.ops.append("tolist")
            return reads.tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        ACTIVE.remove(self)
        return super().__exit__(*exc)

    @property
    def count(self):
        return len(self.ops)

    def mark(self):
        """Start a new interval (a step, a minibatch): per_interval() counts the reads in each."""
        self.marks.append(len(self.ops))

    def per_interval(self):
        """The reads between each mark and the next (the last: to the end)."""
        ends = self.marks[1:] + [len(self.ops)]
        return [self.ops[a:b] for a, b in zip(self.marks, ends)]


ACTIVE = []  # the counters entered


def host(fn):
    """fn, run with the counting off: host-side work (collate from lists) is no device read."""
    def run(*args, **kwargs):
        for reads in ACTIVE:
            reads.paused += 1
        try:
            return fn(*args, **kwargs)
        finally:
            for reads in ACTIVE:
                reads.paused -= 1
    return run
