"""gender_jax: a JAX/Flax male/female face classifier (Male = 1, Female = 0)."""

from gender_jax import cpu as _cpu

__version__ = '0.1.0'

# XLA:CPU options must be in the environment before JAX creates its backend.
_cpu.set_xla_flags()
