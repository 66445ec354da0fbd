"""Training: arguments, recipes, the loop on Megatron-Core, checkpoints."""
