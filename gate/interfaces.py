"""
The seams of the gate: what a store, a backend client and a client
connection must provide.

Every method that may touch the network returns a L{Deferred}, even where the
in-memory implementation answers at once, so that the Redis and PostgreSQL
stores drop in without changing their callers.
"""

from zope.interface import Attribute, Interface


class IMailboxStore(Interface):
    """
    Per-player persistent pushes, numbered by C{seq} from 1 up, with gaps
    only where retention dropped messages.
    """

    def append(player_ids, route, data, ts):
        """
        Store one push for each of C{player_ids} and number it per player.

        One call for all recipients of a push, so a networked store can send
        them in one round trip.

        @return: L{Deferred} firing with the stored L{gate.mailbox.Entry}s,
            one per player id, in order.
        """

    def read_after(player_id, last_seq):
        """
        The retained pushes with C{seq > last_seq}, oldest first.

        @return: L{Deferred} firing with C{(gap, entries)}: C{gap} is
            C{(from, to)} for pushes after C{last_seq} that retention dropped,
            or C{None}.
        """

    def ack(player_id, seq):
        """
        Forget the pushes of C{player_id} up to and including C{seq}.
        """

    def last_seq(player_id):
        """
        @return: L{Deferred} firing with the highest seq assigned so far (0
            when none).
        """

    def size(player_id):
        """
        @return: L{Deferred} firing with the number of retained pushes.
        """

    def drop(player_id):
        """
        Remove the mailbox of C{player_id} entirely (the player expired).
        """


class IPlayerDirectory(Interface):
    """
    Which gate and session each known player is on.

    Shared between gates by the Redis store; the in-memory one serves a
    single gate.
    """

    def claim(player_id, gate_id, session_id, now):
        """
        Record that C{player_id} is now on C{session_id} of C{gate_id}.

        @return: L{Deferred} firing with the previous
            L{gate.player.Location} if the player was online, else C{None}.
        """

    def release(player_id, gate_id, session_id, now):
        """
        Mark C{player_id} offline if it is still on C{session_id}.

        @return: L{Deferred} firing with whether it was.
        """

    def lookup(player_id):
        """
        @return: L{Deferred} firing with the player's L{gate.player.Location}
            (C{session_id} C{None} when offline), or C{None} if unknown.
        """

    def forget(player_id):
        """
        Remove C{player_id} (expired).
        """


class IBackendClient(Interface):
    """
    The gate's calls to a game backend (PROTOCOL.md section 4).

    Failures are L{gate.errors.GateError}s carrying the code owed to the
    client (C{backend_unavailable}, C{backend_timeout}, ...).
    """

    def login(session_id, data):
        """
        @return: L{Deferred} firing with C{(player_id, data)}.
        """

    def call(session_id, player_id, request_id, route, data):
        """
        @return: L{Deferred} firing with the reply's C{data}.
        """

    def event(body):
        """
        Deliver one lifecycle event once; fails on any non-2xx answer.
        """

    def register(body):
        """
        Send one C{POST /gates} registration.
        """

    def close():
        """
        Drop pooled connections; returns a L{Deferred}.
        """


class IClientConnection(Interface):
    """
    What a session needs from the connection under it; TCP and WebSocket
    protocols provide it and hold no other logic.
    """

    transport_name = Attribute("'tcp' or 'ws' (with '+tls' when encrypted)")
    peer = Attribute("The peer address as 'host:port'")
    paused = Attribute("Whether the client is not keeping up: writes wait "
                       "in the gate. The connection calls the session's "
                       "writable() when it drains.")

    def send(outgoing):
        """
        Queue one L{gate.envelope.Outgoing} to the client.
        """

    def close():
        """
        Close once what was sent has been written.
        """

    def abort():
        """
        Drop the connection now.
        """
