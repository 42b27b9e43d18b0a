"""torch.cuda's device, stream, graph and allocator calls, stubbed on a CPU build, for the CUDA-only
control flow (sampling's CUDA graph, plumbing/runs.py's memory readout): each call is logged with the device
it acts on, as the real calls would act (a stream belongs to a device; setting one makes its
device current; a graph captures on the current device and stream), and the graph is emulated:
what it records is replayed on the same tensors. With torch's fake tensors on "cuda:1" the code
under test takes its CUDA path on a CPU; with CPU tensors it computes real values."""
import contextlib
import itertools

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode


class FakeStream:
    def __init__(self, device, name):
        self.device, self.device_index, self.name = torch.device("cuda", device), device, name

    def wait_stream(self, other):
        pass

    def __repr__(self):
        return f"<stream {self.name} on cuda:{self.device_index}>"


class StreamContext:
    """torch.cuda.StreamContext: a class, not a generator, so that a context never exited (as
    torch.cuda.graph leaves its own when capture_end raises) is not exited by its collection."""

    def __init__(self, cuda, stream):
        self.cuda, self.stream = cuda, stream

    def __enter__(self):
        cuda = self.cuda
        self.before = cuda.current_stream()
        self.other = cuda.current_stream(self.stream.device_index) if self.before.device != self.stream.device else None
        cuda.set_stream(self.stream)

    def __exit__(self, *exc):
        if self.other is not None:
            self.cuda.set_stream(self.other)
        self.cuda.set_stream(self.before)


class Recorder(TorchDispatchMode):
    """A capture: the aten ops run inside, recorded; one that writes a tensor is not run (a captured
    kernel changes nothing until replay), one that reads the device back fails, as on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        if func._schema.is_mutable:
            self.ops.append((func, args, kwargs, None))
            return args[0]
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class FakeGraph:
    """torch.cuda.CUDAGraph: capture_begin ... capture_end records (Recorder), on the current device
    and stream; replay runs the recorded ops again on the same tensors, each result written into
    the tensor the capture returned (not a view's: it shares its base's memory)."""

    def __init__(self, cuda):
        self.cuda, self.ops, self.replays = cuda, [], 0
        cuda.graphs.append(self)

    def capture_begin(self, pool=None, capture_error_mode="global", **kwargs):
        cuda = self.cuda
        self.device, self.stream = cuda.current, cuda.current_stream()
        if self.stream is cuda.default_stream():
            raise RuntimeError("CUDA graphs must be captured on a non-default stream.")
        self.pool_id = pool or ("graph", id(self))
        cuda.underway.add((self.device, self.pool_id))  # beginAllocateToPool
        cuda.log.append(("capture_begin", self.device))
        self.recorder = Recorder()
        self.recorder.__enter__()

    def capture_end(self):
        """As CUDAGraph::capture_end: a failed cudaStreamEndCapture raises before the allocator's
        endAllocateToPool; the stream stops capturing either way."""
        self.recorder.__exit__(None, None, None)
        if self.cuda.current_stream() is not self.stream:
            raise RuntimeError("Capture must end on the same stream it began on.")
        if self.cuda.fail_capture:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.cuda.underway.discard((self.device, self.pool_id))
        self.ops = self.recorder.ops

    def replay(self):
        self.replays += 1
        self.cuda.log.append(("replay", self.device))
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):  # kernels, as recorded
            for func, args, kwargs, out in self.ops:
                result = func(*args, **kwargs)
                if out is None or func._schema.returns[0].alias_info is not None:
                    continue
                for o, r in zip(*(x if isinstance(x, (tuple, list)) else [x] for x in (out, result))):
                    if isinstance(o, torch.Tensor):
                        o.copy_(r)

    def pool(self):
        return self.pool_id


class FakeCuda:
    """The stubs, installed with monkeypatch; fail_capture: every capture_end fails. The CPU, for
    tests on CPU tensors, stands for device 0."""

    def __init__(self, monkeypatch, fail_capture=False):
        self.current, self.fail_capture = 0, fail_capture
        self.defaults, self.currents = {}, {}  # device: its default stream, its current stream
        self.log, self.graphs, self.underway, self.released = [], [], set(), []
        self.names = itertools.count()
        cuda = torch.cuda
        for name, fake in [("is_available", lambda: True), ("is_bf16_supported", lambda *a, **k: True),
                           ("device_count", lambda: 2), ("current_device", lambda: self.current),
                           ("Stream", self.Stream), ("current_stream", self.current_stream),
                           ("default_stream", self.default_stream), ("set_stream", self.set_stream),
                           ("stream", self.stream), ("device", self.device), ("synchronize", self.synchronize),
                           ("empty_cache", lambda: self.log.append(("empty_cache", self.current))),
                           ("CUDAGraph", lambda *a, **k: FakeGraph(self)),
                           ("graph_pool_handle", lambda: ("handle", next(self.names)))]:
            monkeypatch.setattr(cuda, name, fake)
        monkeypatch.setattr(torch, "tensor", self.tensor)
        monkeypatch.setattr(cuda.graph, "default_capture_stream", None)  # a class attribute torch.cuda.graph fills once
        for name, fake in [("_cuda_endAllocateToPool", self.end_allocate), ("_cuda_releasePool", self.release),
                           ("_cuda_endAllocateCurrentStreamToPool", self.end_allocate),
                           ("_host_emptyCache", lambda: None)]:
            monkeypatch.setattr(torch._C, name, fake, raising=False)

    @staticmethod
    def tensor(data, device=None, _make=torch.tensor, **kwargs):
        """torch.tensor: made on the host, then copied into a tensor on the device, a copy fake
        tensors can make (they make torch.tensor's own copy, or one from a real tensor, for real)."""
        with unset_fake_temporarily():
            host = _make(data, **kwargs)
        return torch.empty(host.shape, dtype=host.dtype, device=device).copy_(host)

    def index(self, device=None):
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return 0 if device.type == "cpu" else self.current if device.index is None else device.index

    def default_stream(self, device=None):
        d = self.index(device)
        return self.defaults.setdefault(d, FakeStream(d, "default"))

    def current_stream(self, device=None):
        d = self.index(device)
        return self.currents.get(d) or self.default_stream(d)

    def Stream(self, device=None, priority=0):
        d = self.index(device)
        self.log.append(("Stream", d))
        return FakeStream(d, f"side{next(self.names)}")

    def set_stream(self, stream):
        """As torch._C._cuda_setStream: the stream's device becomes current, and the stream current there."""
        self.current = stream.device_index
        self.currents[stream.device_index] = stream
        self.log.append(("set_stream", stream.device_index))

    def synchronize(self, device=None):
        self.log.append(("synchronize", self.index(device)))

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, self.index(device)
        try:
            yield
        finally:
            self.current = before

    def stream(self, stream):
        return StreamContext(self, stream)

    def end_allocate(self, device, pool):
        if (device, pool) not in self.underway:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        self.underway.discard((device, pool))

    def release(self, device, pool):
        self.released.append((device, pool))

    def as_before(self):
        """The current device is 0 and every device's current stream its default."""
        return self.current == 0 and all(s is self.default_stream(d) for d, s in self.currents.items())
