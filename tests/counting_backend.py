"""A ``torch.compile`` backend for the compile tests: it records every graph it is handed
(in ``GRAPHS``) and runs it as traced, so a test counts compilations without inductor."""

import torch

GRAPHS = []  # graphs handed to the backend, in order
NAME = "secant_test_counting"


@torch._dynamo.register_backend(name=NAME)
def _counting_backend(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward
