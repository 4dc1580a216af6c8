"""Policy stage: secrets, gateway keys, the pure credential decision, the answers
compiled once per config, and ``process`` (one ProcessingRequest in, one answer out).

Imports only ``extproc.config``; knows nothing of sockets, gRPC or processes.
"""
