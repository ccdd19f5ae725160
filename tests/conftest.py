"""Shared test setup.

Tiny models run fastest on one CPU thread, and a shared 2-core machine makes multi-threaded
kernels spin against each other; tests pin torch to one thread.
"""

import torch

torch.set_num_threads(1)
