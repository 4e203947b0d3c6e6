"""DiffusionGemma SFT entry point (same as `blockdiff train`).

    torchrun --standalone --nproc-per-node=8 examples/dllm_sft/finetune.py -c examples/dllm_sft/diffusion_gemma_sft.yaml
    python examples/dllm_sft/finetune.py -c examples/dllm_sft/diffusion_gemma_sft.yaml --train.max_steps 10
"""

import sys

from blockdiff.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
