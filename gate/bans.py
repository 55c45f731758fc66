"""
Bans of players, set by C{POST /v1/kick} with C{ban_seconds}: while a
player is banned its login, auth and resume answer C{auth_failed}, and the
resume tokens issued to it before the ban are revoked for good.

A small object with a small API (L{Bans.ban}, L{Bans.banned},
L{Bans.revoked_before}) so that a store shared by several gates can stand
in for it: L{SharedBans}, which keeps them in Redis where every gate's
claim checks them.

Tests: C{tests/test_bans.py}.
"""

import heapq


class Bans:
    """
    Bans and token revocations of this gate, on its clock.

    An entry is kept while its ban lasts and, for its revocation, until the
    tokens it revoked have expired anyway (C{token_ttl} after it, that is
    C{auth.resume_ttl}); expired entries are dropped as new ones come, so
    what is kept is bounded by the kicks of one token lifetime.

    @param clock: an L{IReactorTime}.
    @param token_ttl: the lifetime of the tokens a ban revokes.
    """

    def __init__(self, clock, token_ttl):
        self._clock = clock
        self._token_ttl = token_ttl
        # player_id -> [until, revoked_before, forget_at]
        self._entries = {}
        # (forget_at, player_id), to find expired entries without a scan.
        self._expiry = []

    def __len__(self):
        return len(self._entries)

    def ban(self, player_id, until):
        """
        Ban C{player_id} until the clock reads C{until} (a time not after
        now lifts a ban) and revoke every token issued to it until now.

        A later ban replaces the end of an earlier one, so an operator may
        shorten or lift a ban; revocations only ever move forward.
        """
        now = self._clock.seconds()
        self._prune(now)
        forget_at = max(until, now + self._token_ttl)
        entry = self._entries.get(player_id)
        if entry is None:
            self._entries[player_id] = [until, now, forget_at]
        else:
            entry[0] = until
            entry[1] = max(entry[1], now)
            entry[2] = max(entry[2], forget_at)
            forget_at = entry[2]
        heapq.heappush(self._expiry, (forget_at, player_id))

    def banned(self, player_id):
        """
        Whether C{player_id} is banned now.
        """
        entry = self._entries.get(player_id)
        return entry is not None and entry[0] > self._clock.seconds()

    def revoked_before(self, player_id):
        """
        The time up to which (inclusive) tokens issued to C{player_id} are
        revoked, or C{None}.
        """
        entry = self._entries.get(player_id)
        if entry is None or entry[2] <= self._clock.seconds():
            return None
        return entry[1]

    def _prune(self, now):
        expiry = self._expiry
        entries = self._entries
        while expiry and expiry[0][0] <= now:
            forget_at, player_id = heapq.heappop(expiry)
            entry = entries.get(player_id)
            # A later ban of the same player pushed its own, later time.
            if entry is not None and entry[2] <= now:
                del entries[player_id]


class SharedBans:
    """
    Bans of gates sharing a Redis store (C{store.kind = redis}): recorded
    there (L{mmogate_plugins.redis.RedisStore.ban}), with a TTL until the
    ban and the tokens it revoked are over, and checked by the claim
    script that every login, auth and resume runs on any gate (a resume
    passes its token's C{iat}). So the gate itself holds none: L{banned}
    and L{revoked_before} answer "no" and the store refuses the claim,
    with no round trip of its own and no race with a ban made elsewhere.

    @param store: the L{mmogate_plugins.redis.RedisStore}.
    @param clock: an L{IReactorTime}.
    @param token_ttl: the lifetime of the tokens a ban revokes.
    """

    shared = True

    def __init__(self, store, clock, token_ttl):
        self._store = store
        self._clock = clock
        self._token_ttl = token_ttl

    def __len__(self):
        return 0

    def ban(self, player_id, until):
        """
        Ban C{player_id} until C{until} and revoke its tokens issued until
        now, on every gate.

        @return: L{Deferred} firing once Redis recorded it (failing with
            L{gate.cluster.StoreUnavailable} when it cannot be reached).
        """
        return self._store.ban(player_id, until, self._clock.seconds(),
                               self._token_ttl)

    def banned(self, player_id):
        return False

    def revoked_before(self, player_id):
        return None
