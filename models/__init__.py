"""pyro-lvm: models."""
