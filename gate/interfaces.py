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

    def claim(player_id, gate_id, session_id, now, epoch=None, issued=None):
        """
        Record that C{player_id} is now on C{session_id} of C{gate_id}.

        The directory owns the player's incarnation (C{epoch}, named in
        resume tokens): it makes a new one when it creates the player and
        keeps it while the player lives, so every gate rejects the tokens of
        an expired player.

        @param epoch: for a resume, the incarnation the client's token
            names: the claim is made only if the player is known with that
            incarnation (a resume never creates a player).
        @param issued: for a resume, its token's C{iat}: a directory that
            keeps bans (the Redis store) refuses a token issued before one,
            and refuses a banned player's claims, with a
            L{gate.errors.GateError} (C{resume_rejected}, C{auth_failed}).
        @return: L{Deferred} firing with a L{gate.player.Claim}
            (C{previous} is the player's L{gate.player.Location} if it was
            online, else C{None}), or with C{None} when C{epoch} was given
            and does not match.
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

    def expire(player_id, gate_id, epoch):
        """
        Remove C{player_id} only if it is still offline, last on
        C{gate_id} and of incarnation C{epoch}, as one step; a shared store
        removes its mailbox in the same step. A player that came back
        meanwhile, on any gate, is untouched.

        @return: L{Deferred} firing with whether it was removed.
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


class IAuditLog(Interface):
    """
    The session audit log: C{connect}, C{login} (also for C{auth}),
    C{resume}, C{kick}, C{disconnect} and C{expiry}, with gate, peer and
    reason.

    Recording is on the session's path, so it never waits and never
    raises: an implementation that writes elsewhere buffers, and drops (and
    counts) what it cannot keep.
    """

    def record(event, player_id, session_id, gate_id, peer, reason, ts):
        """
        Note one event; any field but C{event}, C{gate_id} and C{ts} may be
        C{None}.
        """

    def history(player_id=None, session_id=None, limit=100):
        """
        @return: L{Deferred} firing with at most C{limit} events matching
            the given player and/or session, newest first, each a dict of
            C{event}, C{player_id}, C{session_id}, C{gate_id}, C{peer},
            C{reason} and C{ts}.
        """


class IClusterBus(Interface):
    """
    How gates that share a store reach each other's players: every gate
    listens on a channel of its own and on one of the whole cluster, and a
    push is placed (numbered, stored and handed to each player's gate) in
    one step of the store, so a player's pushes reach its session in seq
    order whichever gates sent them.

    The in-memory bus serves one gate alone: C{shared} is false and the
    L{gate.player.PlayerManager} routes everything itself.
    """

    shared = Attribute("Whether other gates may hold this gate's players: "
                       "if so, routing goes through L{gate.cluster.Cluster}")
    reachable = Attribute("Whether the store answers now (false during an "
                          "outage, while it reconnects)")

    def listen(gate_id, receiver):
        """
        Start listening on C{gate_id}'s channel and the cluster's.

        C{receiver.received(header, payload)} gets each message (C{header}
        a dict with C{op}); C{receiver.resync(resubscribed)} is called each
        time the store becomes reachable, C{resubscribed} true when
        messages may have been missed meanwhile.
        """

    def place(gate_id, player_ids, head, ts, persist):
        """
        Number and store a push (C{persist}) for each known player and hand
        it to the gate of each online one.

        @param head: the push envelope's bytes without the closing brace
            (L{gate.envelope.PushTemplate}).
        @return: L{Deferred} firing with one C{(outcome, seq)} per player
            id: outcome C{"delivered"} (handed to a live gate),
            C{"offline"} (stored, or dropped if transient) or C{"unknown"}.
        """

    def send_to_player(player_id, op, payload):
        """
        Hand C{op} to the gate where C{player_id} is online.

        @return: L{Deferred} firing with whether a live gate took it.
        """

    def send_to_gate(gate_id, header, payload):
        """
        Hand a message to C{gate_id}.

        @return: L{Deferred} firing with whether it listened.
        """

    def broadcast(gate_id, payload):
        """
        Hand C{payload} (an encoded envelope) to every other gate.

        @return: L{Deferred} firing with C{{gate_id: online players}} as
            the other live gates last reported.
        """

    def heartbeat(gate_id, online):
        """
        Mark C{gate_id} alive for a while, with its count of online players.
        """

    def refresh(gate_id, players):
        """
        Keep the entries of this gate's players alive and check them:
        C{players} is a list of C{(player_id, session_id or "", epoch,
        seq)}, C{""} for an offline player.

        @return: L{Deferred} firing with one status per player: C{"ok"},
            C{"missing"} (offline player gone), C{"recreated"} (online
            player put back, numbered on from C{seq}) or C{"elsewhere"}.
        """

    def info(player_id):
        """
        @return: L{Deferred} firing with C{(location, last_seq, mailbox,
            alive)} or C{None} for an unknown player; C{alive} says whether
            its gate is live.
        """

    def adopt(gate_id, now):
        """
        Take over the players an earlier process of C{gate_id} left in the
        store (it died or stopped): online ones go offline as of C{now};
        this process expires them all from now on.

        @return: L{Deferred} firing with C{(player_id, epoch, since,
            session_id or None)} per player taken over (C{session_id}: the
            session it still had).
        """

    def stop(gate_id):
        """
        Leave the cluster: mark C{gate_id} gone and disconnect, once the
        store has answered what was sent to it.
        """
