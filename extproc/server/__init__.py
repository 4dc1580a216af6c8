"""Server stage: the gRPC ext_proc and health services over the lean HTTP/2 server
(or grpcio, the reference), Unix sockets and the processor's metrics.

Imports ``extproc.config``, ``extproc.policy`` and ``extproc.usage`` (the meter and the
limiter its calls feed); never the runtime that runs it.
"""
