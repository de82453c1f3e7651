"""Root pytest configuration (applies to tests/ and plugins/*/tests).

The suite runs as `pytest -n 2` on 2 cores: one torch thread per worker avoids two workers'
thread pools fighting over the same cores (10-20x slower kernels otherwise). Subprocesses
started by tests inherit the same setting.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
