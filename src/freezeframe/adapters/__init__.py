"""Concrete implementations of the ports in freezeframe.ports."""
