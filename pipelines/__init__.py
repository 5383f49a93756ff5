"""Stencil's engine: everything that touches torch and diffusers. Never imports gradio."""
