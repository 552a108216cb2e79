"""gender_jax: a JAX/Flax male/female face classifier (Male = 1, Female = 0)."""

__version__ = '0.1.0'
