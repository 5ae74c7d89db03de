"""pyro-lvm: studies."""
