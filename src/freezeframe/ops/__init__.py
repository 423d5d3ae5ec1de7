"""The operations, each a pure core over the ports (see docs/architecture.md)."""
