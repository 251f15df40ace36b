"""Lightning modules and data modules built on pnp's core: baseline training, pruner training, fine-tuning."""
