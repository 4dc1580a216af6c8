"""Runtime stage: running things. ``serve`` and ``up``, the supervisor and workers,
config reloads, the xDS files Envoy watches and its admin API.

May import every stage below it (config, policy, render, server).
"""
