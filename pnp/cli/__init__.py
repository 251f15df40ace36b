"""Command-line entry points: Hydra apps that wire the core and training floors together.

``pnp-train``, ``pnp-train-pruner``, ``pnp-prune``, ``pnp-finetune`` and
``pnp-pipeline`` each compose a config from the ``configs/`` tree, check it, and
run one stage (or all four) into its own output directory.
"""
