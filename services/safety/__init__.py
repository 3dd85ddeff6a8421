"""The safety service."""
