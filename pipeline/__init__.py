"""Offline knowledge distillation: teacher top-k logit cache -> LoRA student."""

__version__ = "0.1.0"
