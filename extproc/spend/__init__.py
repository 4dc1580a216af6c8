"""Spend stage: usage records priced in money, budgets in USD per client, team and the
organisation over calendar periods, and the ledger that keeps them in a database.

Placed after ``extproc.usage`` in the flow; imports ``extproc.config``, ``extproc.policy``
and ``extproc.usage`` only. The server and runtime import it.
"""
