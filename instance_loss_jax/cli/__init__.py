"""The binaries, each a thin absl program over the library, and `runner`, what they share
(multi-host flags, quiet library logs, `--print_config`, one-line user errors, exit codes).

Nothing in the package imports from here. `python -m instance_loss_jax.X` for the older paths
(train, evaluate, export, search, ablate, port_resnet, data.synthetic, evaluation) still runs
the same binary, for one release.
"""
