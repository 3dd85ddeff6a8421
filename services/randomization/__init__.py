"""The randomization service."""
