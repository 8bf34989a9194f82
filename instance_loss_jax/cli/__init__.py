"""The binaries, each a thin absl program over the library, and `runner`, what they share
(multi-host flags, quiet library logs, `--print_config`, one-line user errors, exit codes).

Nothing in the package imports from here, and no other module of the package is a binary:
`python -m instance_loss_jax.cli.X` is the one path of each command.
"""
