"""The dosing service."""
