"""pyro-lvm: inference."""
