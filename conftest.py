"""Root pytest configuration (applies to tests/ and plugins/*/tests).

The suite runs as `pytest -n 2` on 2 cores: one torch thread per worker avoids two workers'
thread pools fighting over the same cores (10-20x slower kernels otherwise). Subprocesses
started by tests inherit the same setting.

The tests' feature cache is a fresh folder of this session (``$MMCORE_CACHE_DIR``, inherited by
every subprocess), never the user's ``~/.cache/mmcore``: what another mmcore left there (an older
cache format, a full disk) must not change what a test sees.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["MMCORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmcore-test-cache-")
atexit.register(shutil.rmtree, os.environ["MMCORE_CACHE_DIR"], True)

import torch  # noqa: E402

torch.set_num_threads(1)
