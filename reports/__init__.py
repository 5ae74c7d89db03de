"""pyro-lvm: reports."""
