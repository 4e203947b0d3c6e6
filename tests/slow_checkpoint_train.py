"""``blockdiff train`` whose checkpoint writes pause after the model file (kill -9 tests).

    python tests/slow_checkpoint_train.py SECONDS -c FILE [--section.field value ...]

Each ``save_checkpoint`` then sleeps SECONDS between writing ``model.safetensors`` and the optimizer
file, so a test can kill the run in the middle of a checkpoint write.
"""

from __future__ import annotations

import os
import sys
import time

import blockdiff.checkpoint.training as checkpoint
from blockdiff.cli.main import main


def pause_after_model_file(seconds: float):
    write = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        write(tensors, filename, *args, **kwargs)
        if os.path.basename(filename) == "model.safetensors":
            time.sleep(seconds)

    checkpoint.save_file = save_file


if __name__ == "__main__":
    pause_after_model_file(float(sys.argv[1]))
    sys.exit(main(["train", *sys.argv[2:]]))
