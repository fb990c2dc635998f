"""The bottom layer: models, diffusion, checkpoints and the training run; imports nothing of ours above it."""
