"""Interoperability with other array frameworks: GhostVis parameter pytrees in JAX.

``to_jax`` / ``from_jax`` move a pytree between PyTorch and JAX through DLPack
without copying a byte; :mod:`ghostvis.interop.jax_model` is an independent
``jax.numpy`` implementation of the whole forward over the same pytree.

JAX is an optional dependency (the ``jax`` extra): importing this package does
not import it; the first conversion does.
"""

from .dlpack import from_jax, load_jax, to_jax

__all__ = ["to_jax", "from_jax", "load_jax"]
