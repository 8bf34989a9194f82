"""Training: the losses (paper eqs. 4-9), SGD with its parameter groups, the train state and the
train step over a device mesh. The loop that drives them is `instance_loss_jax.trainer`.

The face re-exports the state, batch and step API (`from instance_loss_jax import training as
ts`); the modules import one another by their own paths.
"""
from instance_loss_jax.training.batch import abstract_batch, check_batch
from instance_loss_jax.training.state import (
    TrainState, abstract_train_state, abstract_variables, create_train_state, host_state,
    init_compiler_options, place_state, state_from_variables, variables_of)
from instance_loss_jax.training.step import TrainStep, make_train_step

__all__ = ["TrainState", "abstract_batch", "abstract_train_state", "abstract_variables",
           "check_batch", "create_train_state", "host_state", "init_compiler_options",
           "make_train_step", "place_state", "state_from_variables",
           "TrainStep", "variables_of"]
