"""Config stage: the ops YAML read with line numbers, validated section by section
into the frozen, secret-free ``GatewayConfig`` model.

Imports nothing else from ``extproc``; every other stage imports from here.
"""
