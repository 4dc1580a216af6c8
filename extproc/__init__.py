"""Credential gateway: Envoy + an ext_proc service that adds the server's API key
only when the client sent no credential of its own."""
