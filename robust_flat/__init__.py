"""robust-flat: adversarial robustness and weight-space flatness of the robust loss, in JAX/Flax."""
__version__ = "0.1.0"
