"""Tooling around the services: the `trial` command and the launcher that starts the system.
It may import services; the kernel (`shared/`) never does."""
