"""addkit: Adversarial Diffusion Distillation parts for your own trainer."""

__version__ = "0.1.0"
