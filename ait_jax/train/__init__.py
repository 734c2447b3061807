"""Training: configs, optimizer, train state, the loop, checkpoints, reporting."""
