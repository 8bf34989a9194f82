"""MatConvNet's networks: DagNN .mat files (`dagnn.py`), their ImageNet ResNets, and the
authors' dual-path models (`dual_path.py`)."""

from instance_loss_jax.matconvnet.dagnn import (  # noqa: F401
    DagNN, Layer, input_convention, read_dagnn, read_mat, resnet_variables)
