import os
import sys

import torch

# Tiny models: one intra-op thread is faster than two oversubscribed ones (and CI has 2 cores).
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests import shared helpers (helpers.py, other test modules)
