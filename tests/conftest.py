import os

import torch

# Tests are small; one thread per process keeps multi-process tests from fighting over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
