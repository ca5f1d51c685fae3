"""storage: see README."""
