"""Flax modules of the dual-path model."""
from instance_loss_jax.models.dual_path import (DualPath, Head, build_model, dropout_mask,
                                                l2_normalize)
from instance_loss_jax.models.resnet import STAGE_SIZES, ResNet
from instance_loss_jax.models.text_cnn import TextCNN

__all__ = ["DualPath", "Head", "build_model", "dropout_mask", "l2_normalize", "STAGE_SIZES",
           "ResNet", "TextCNN"]
