"""deployments: see README."""
