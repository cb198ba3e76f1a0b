"""PyTorch side of the export: `gseps_torch.py` is copied verbatim into every hf export.

It imports only torch, transformers and safetensors (never gseps_jax), so an export directory is
usable without this package; `gseps_jax.export` locates it with `importlib.resources`.
"""
