"""Reinforcement learning with verifiable rewards (GRPO) for DiffusionGemma: ``blockdiff rl``."""
