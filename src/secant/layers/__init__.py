"""Layer capture for Kronecker-factored optimizers (``nn.Linear``, ``nn.Conv2d``, transformers'
``Conv1D``; more with :func:`register_layer`)."""

from secant.layers.capture import (
    LayerCapture,
    LayerKind,
    LayerRecord,
    add_to_params,
    grad_matrix,
    homogeneous_inputs,
    is_supported,
    layer_kind,
    layer_params,
    matrix_rows,
    matrix_shape,
    output_rows,
    param_matrix,
    register_layer,
    weight_layout,
    weight_matrix,
)
from secant.layers.fisher import sampled_bce_with_logits, sampled_cross_entropy, sampled_mse

__all__ = [
    "LayerCapture",
    "LayerKind",
    "LayerRecord",
    "add_to_params",
    "grad_matrix",
    "homogeneous_inputs",
    "is_supported",
    "layer_kind",
    "layer_params",
    "matrix_rows",
    "matrix_shape",
    "output_rows",
    "param_matrix",
    "register_layer",
    "sampled_bce_with_logits",
    "sampled_cross_entropy",
    "sampled_mse",
    "weight_layout",
    "weight_matrix",
]
