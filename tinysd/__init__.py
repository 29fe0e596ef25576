# tinysd: Stable Diffusion inference on tinygrad.
__version__ = "0.1.0"
