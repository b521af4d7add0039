"""Generative models: class-conditional image generation (DCGAN) and image repair (inpainting)."""
