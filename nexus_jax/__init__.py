"""nexus_jax."""
