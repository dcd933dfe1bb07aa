"""Hand-written kernels for what XLA's own code generation does poorly, each with a pure-JAX twin it must equal."""
