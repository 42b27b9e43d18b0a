"""Peak memory without the memory: PeakMemory counts the bytes of every tensor storage alive at
each op and keeps the peak, on real tensors or on fake ones (torch's FakeTensorMode: shapes and
dtypes, no storage, no arithmetic), so that a step of a 7B model is measured on a laptop.
bench/memory.py runs the stages' steps under it; materialize gives models built on the meta
device their tensors in it, and CudaPeak stands in for it on a GPU, where the allocator counts."""
import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

SMALL = 1 << 20  # a tensor of at most this many elements (masks, token ids, scalars) carries real values


class PeakMemory(TorchDispatchMode):
    """The bytes of tensor storage alive after each op run inside, and their peak.

    Under a FakeTensorMode the big tensors (weights, activations, logits) have shapes only, while
    every small one also carries a real twin, computed from its inputs' twins when they all have
    one (masks, token ids, lengths: the packing, the boolean indexing and the sampler's checks take
    their real values), else made up: zeros (True for a flag), so a loss reads as finite and a
    sampled token is never the end of a sequence, which is the longest and so the largest case.
    """

    device = "cpu"  # where the steps run under it (bench_memory.CudaPeak: "cuda")

    def __init__(self, fake_mode=None):
        super().__init__()
        self.fake_mode = fake_mode
        self.twin = WeakIdKeyDictionary()  # fake tensor -> its real values
        self.seen = WeakIdKeyDictionary()  # storages counted
        self.live = self.peak = 0

    def count(self, t):
        """Start counting tensor t's storage, once, until it is freed (a meta tensor has none)."""
        if t.is_meta:
            return
        st = t.untyped_storage()
        if st in self.seen:
            return
        n = st.nbytes()
        self.seen[st] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self.free, n)

    def free(self, n):
        self.live -= n

    def count_now(self, tensors):
        """Tensors that exist before the step (the weights, optimizer state): counted from the start."""
        for t in tensors:
            self.count(t)

    def real(self, x):
        """A tensor's twin; a real tensor (a constant the code made) is its own."""
        return self.twin.get(x, x) if isinstance(x, torch.Tensor) else x

    def fake_of(self, real):
        """A fake tensor whose twin is `real` (without a fake mode: real itself)."""
        if self.fake_mode is None:
            return real
        fake = self.fake_mode.from_tensor(real)
        self.twin[fake] = real
        return fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs) if self.fake_mode is None else self.fake_dispatch(func, args, kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.count(t)
        return out

    def fake_dispatch(self, func, args, kwargs):
        """The op on the fake tensors, and on their twins where every input has one and the outputs
        are small: each output's twin is the op's real output, views and writes included."""
        flat, spec = tree_flatten((args, kwargs))
        known = all(x in self.twin or not isinstance(x, FakeTensor) for x in flat if isinstance(x, torch.Tensor))
        if func is torch.ops.aten.index.Tensor and not known:  # a big tensor at a mask's positions
            return self.with_twins(func(*self.long_indices(args), **kwargs))
        try:
            out = func(*args, **kwargs)
        except Exception as e:  # a shape or a value that only the twins have
            if "DataDependent" not in type(e).__name__ and "DynamicOutputShape" not in type(e).__name__:
                raise
            if not known:
                return self.made_up(func, args)
            return tree_map(lambda r: self.fake_of(r) if isinstance(r, torch.Tensor) else r,
                            self.on_twins(func, flat, spec))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if known and all(t.numel() <= SMALL for t in outs):
            real_outs = [t for t in tree_flatten(self.on_twins(func, flat, spec))[0] if isinstance(t, torch.Tensor)]
            for fake, real in zip(outs, real_outs):
                self.twin[fake] = real
            return out
        for arg, a in zip(func._schema.arguments, args):  # written from values no twin has: forget it
            if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write:
                self.twin.pop(a, None)
        return self.with_twins(out)

    def on_twins(self, func, flat, spec):
        real_args, real_kwargs = tree_unflatten([self.real(x) for x in flat], spec)
        with unset_fake_temporarily():
            return func(*real_args, **real_kwargs)

    def long_indices(self, args):
        """aten.index's arguments with each boolean index (a mask with a twin) as the long indices of its Trues."""
        x, indices = args[0], list(args[1])
        for i, idx in enumerate(indices):
            if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                with unset_fake_temporarily():
                    found = self.real(idx).nonzero(as_tuple=True)
                indices[i:i + 1] = [self.fake_of(f) for f in found]
        return x, indices

    def made_up(self, func, args):
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 0
        if func is torch.ops.aten.equal.default:
            return True
        raise RuntimeError(f"PeakMemory: {func} needs values its inputs do not carry")

    def with_twins(self, out):
        """Small outputs computed from values no twin has get made-up twins (zeros; True for a flag)."""
        def one(t):
            if isinstance(t, torch.Tensor) and t not in self.twin and t.numel() <= SMALL:
                with unset_fake_temporarily():
                    self.twin[t] = (torch.ones if t.dtype == torch.bool else torch.zeros)(t.shape, dtype=t.dtype)
            return t
        return tree_map(one, out)


@contextlib.contextmanager
def fake_world():
    """Tensors made inside are fake (shapes only); PeakMemory counts them: yields the counter."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        tracker = PeakMemory(fake_mode)
        yield tracker


def materialize(tracker, *models):
    """The meta tensors of built models as tensors of the tracker's world (fake, or real for the
    check), on the CPU: shapes, dtypes, requires_grad and tied weights kept; counted from now."""
    made = {}
    for model in models:
        for module in model.modules():
            for group in (module._parameters, module._buffers):
                for name, t in list(group.items()):
                    if t is None or not t.is_meta:
                        continue
                    if id(t) not in made:
                        new = torch.empty(t.shape, dtype=t.dtype, device=tracker.device)
                        if tracker.fake_mode is None:  # real tensors: values as the weights would be
                            torch.nn.init.normal_(new, std=0.02) if new.is_floating_point() else new.zero_()
                        made[id(t)] = torch.nn.Parameter(new, t.requires_grad) if group is module._parameters else new
                    group[name] = made[id(t)]
    tracker.count_now(made.values())


class CudaPeak:
    """The tracker on CUDA (--device cuda): the steps run for real on the GPU, and the peak is the
    caching allocator's own, torch.cuda.max_memory_allocated over the step, weights included."""
    fake_mode, device = None, "cuda"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def count_now(self, tensors):
        pass

    def fake_of(self, real):
        return real.to(self.device)
