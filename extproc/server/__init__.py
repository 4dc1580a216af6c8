"""Server stage: the gRPC ext_proc and health services over the lean HTTP/2 server
(or grpcio, the reference), Unix sockets and the processor's metrics.

Imports ``extproc.config`` and ``extproc.policy``; never the runtime that runs it.
"""
