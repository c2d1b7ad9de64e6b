"""vdd_ros: Variational Diffusion Distillation of diffusion policies into a Mixture of Experts."""

__version__ = '0.1.0'
