"""gseps_jax: JAX/Flax GRM and SEPS fine-grained image-text retrieval."""

__version__ = "0.1.0"
