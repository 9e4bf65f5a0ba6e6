"""Layer capture for Kronecker-factored optimizers (``nn.Linear``, ``nn.Conv2d``)."""

from secant.layers.capture import (
    LayerCapture,
    LayerRecord,
    add_to_params,
    grad_matrix,
    homogeneous_inputs,
    is_supported,
    layer_params,
    matrix_shape,
    output_rows,
    param_matrix,
)
from secant.layers.fisher import sampled_bce_with_logits, sampled_cross_entropy, sampled_mse

__all__ = [
    "LayerCapture",
    "LayerRecord",
    "add_to_params",
    "grad_matrix",
    "homogeneous_inputs",
    "is_supported",
    "layer_params",
    "matrix_shape",
    "output_rows",
    "param_matrix",
    "sampled_bce_with_logits",
    "sampled_cross_entropy",
    "sampled_mse",
]
