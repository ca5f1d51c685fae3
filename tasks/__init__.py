"""tasks: see README."""
