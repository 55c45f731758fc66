"""
Tokens the gate checks on its own: client auth tokens (HS256 JWT minted by
the studio's login service) and resume tokens (minted by the gate).

Both use C{auth.secret}. Resume tokens carry an audience of their own so
neither kind can stand in for the other.
"""

import jwt

RESUME_AUDIENCE = "mmogate:resume"
_INF = float("inf")
_ALGORITHMS = ["HS256"]


class TokenError(Exception):
    """
    A token is malformed, forged, expired or for someone else.
    """


class Tokens:
    """
    Signs and checks tokens with one secret on one clock.

    @param clock: an L{IReactorTime}; tokens expire by its C{seconds()}.
    """

    def __init__(self, secret, clock, resume_ttl):
        self._key = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._clock = clock
        self._resume_ttl = resume_ttl

    def _now(self):
        return self._clock.seconds()

    def _verified(self, token, audience=None):
        # PyJWT checks exp against the wall clock, and ours may be a test
        # clock: expiry is checked in _player against self._clock instead.
        options = {"verify_exp": False, "verify_iat": False,
                   "verify_nbf": False, "require": ["exp", "sub"],
                   "verify_aud": audience is not None}
        if not token.isascii():
            # A compact JWT is base64url and dots; PyJWT would fail to
            # encode a lone surrogate with an error of its own.
            raise TokenError("a token is ASCII text")
        try:
            return jwt.decode(token, self._key, algorithms=_ALGORITHMS,
                              audience=audience, options=options)
        except jwt.PyJWTError as e:
            raise TokenError(str(e))

    def _player(self, claims):
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("'sub' must be a non-empty string")
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) \
                or exp != exp or exp == _INF:
            # NaN compares false with everything: it would never expire.
            raise TokenError("'exp' must be a finite number")
        if exp <= self._now():
            raise TokenError("token has expired")
        return sub

    def player_of_auth_token(self, token):
        """
        @return: the player id (C{sub}) of a valid auth token.
        @raise TokenError: otherwise.
        """
        claims = self._verified(token)
        if claims.get("aud") == RESUME_AUDIENCE:
            raise TokenError("a resume token is not an auth token")
        return self._player(claims)

    def resume_token(self, player_id, epoch=None, issued=None):
        """
        A token that lets C{player_id} resume within C{auth.resume_ttl}.

        @param epoch: the player's incarnation (L{gate.player.Player.epoch}),
            checked on resume.
        @param issued: its C{iat} if not now: when the bind's claim was
            made, so that a ban recorded after the claim revokes it.
        """
        now = self._now()
        if issued is not None and issued < now:
            now = issued
        # iat to the clock's precision: a ban revokes the tokens issued up
        # to its own time, not up to the end of that second.
        claims = {"sub": player_id, "aud": RESUME_AUDIENCE,
                  "iat": now, "exp": int(now + self._resume_ttl)}
        if epoch is not None:
            claims["ep"] = epoch
        return jwt.encode(claims, self._key, algorithm="HS256")

    def check_resume_token(self, token, player_id, revoked_before=None):
        """
        @param revoked_before: tokens issued at or before this time are
            revoked (L{gate.bans.Bans.revoked_before}).
        @return: the token's claims.
        @raise TokenError: unless it is a valid resume token of C{player_id}.
        """
        claims = self._verified(token, audience=RESUME_AUDIENCE)
        if self._player(claims) != player_id:
            raise TokenError("resume token is for another player")
        if revoked_before is not None:
            iat = claims.get("iat")
            if isinstance(iat, bool) or not isinstance(iat, (int, float)) \
                    or not iat > revoked_before:  # NaN is revoked too
                raise TokenError("resume token was revoked (the player was "
                                 "kicked with a ban)")
        return claims
