"""``freezeframe agent``: one per hypervisor host; runs the jobs routed to its host (issue 13)."""
