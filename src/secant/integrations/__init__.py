"""Adapters for training frameworks, one module per framework, each importing its framework
only when imported itself: :mod:`secant.integrations.huggingface` (``transformers.Trainer``).
Lightning needs none: return the optimizer from ``configure_optimizers``."""
