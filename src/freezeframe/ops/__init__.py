"""What happens to a snapshot set after it is taken, one module per operation, each over ports only.

``restore`` (restore, extract, discard), ``revert``, ``retention`` (delete, dependants, backup with rotation),
``verify``; ``build`` makes a new instance or nothing (restore, verify's clone, import); ``common`` holds the
name/set holds, the repair markers and the per-member store choice. ``freezeframe.wiring`` builds them.
"""
