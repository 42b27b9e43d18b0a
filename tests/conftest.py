"""Each pytest-xdist worker (pytest.ini) and every process its tests start compute on the worker's
share of the cores. torch's default, a thread per core in every worker, has the workers' OpenMP
threads spin against each other: on 2 cores the suite took twice as long as in one process."""
import os

import torch

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if workers > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # train.py runs, torchrun's ranks: as many as this worker
