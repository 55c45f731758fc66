"""
The mmogate client library: L{GateClient} speaks PROTOCOL.md sections 1-3
over TCP, TLS or WebSocket and keeps a player's session alive across
reconnects; C{mmogate-client} (L{gate.client.cli}) wraps it for a terminal.
"""

from gate.client.address import Address, parse_address
from gate.client.connection import GateClient, Push
from gate.client.errors import GateError

__all__ = ["Address", "GateClient", "GateError", "Push", "parse_address"]
