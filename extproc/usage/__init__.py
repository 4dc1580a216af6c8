"""Usage stage: token usage read off responses (observed, never in a byte's path) and
the per-gateway-client limits on the organisation's key, with their counter store.

Imports ``extproc.config`` and ``extproc.policy``; the server and runtime import it.
"""
