"""pnp: learned filter pruning for PyTorch."""
