"""
Tests for L{gate.tokens}: HS256 auth tokens and the gate's resume tokens,
expiring by an injected clock.
"""

import base64
import json

import jwt
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gate.tokens import RESUME_AUDIENCE, TokenError, Tokens

SECRET = "a-secret-of-at-least-64-bytes-so-every-hmac-alg-is-content-01234"
OTHER = "another-secret-of-at-least-32-bytes-long"


def mint(claims, key=SECRET, algorithm="HS256", headers=None):
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


class AuthTokenTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.tokens = Tokens(SECRET, self.clock, resume_ttl=3600)

    def test_valid(self):
        token = mint({"sub": "alice", "exp": 1_000_100})
        self.assertEqual(self.tokens.player_of_auth_token(token), "alice")

    def test_bytes_secret(self):
        tokens = Tokens(SECRET.encode(), self.clock, 3600)
        token = mint({"sub": "alice", "exp": 1_000_100})
        self.assertEqual(tokens.player_of_auth_token(token), "alice")

    def test_expiry_by_clock(self):
        """
        Valid until the clock reaches C{exp}, refused from then on, whatever
        the wall clock says.
        """
        token = mint({"sub": "alice", "exp": 1_000_100})
        self.clock.advance(99.5)
        self.assertEqual(self.tokens.player_of_auth_token(token), "alice")
        self.clock.advance(0.5)
        e = self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                              token)
        self.assertIn("expired", str(e))

    def test_wall_clock_not_used(self):
        """
        A token far in the wall clock's past is still valid on a clock that
        is earlier still.
        """
        tokens = Tokens(SECRET, Clock(), 3600)
        self.assertEqual(tokens.player_of_auth_token(
            mint({"sub": "bob", "exp": 10})), "bob")

    def test_float_exp(self):
        token = mint({"sub": "alice", "exp": 1_000_000.5})
        self.assertEqual(self.tokens.player_of_auth_token(token), "alice")
        self.clock.advance(0.5)
        self.assertRaises(TokenError, self.tokens.player_of_auth_token, token)

    def test_missing_exp(self):
        self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                          mint({"sub": "alice"}))

    def test_bad_exp(self):
        for exp in ("soon", True, None, [1]):
            self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                              mint({"sub": "alice", "exp": exp}))

    def test_missing_sub(self):
        self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                          mint({"exp": 1_000_100}))

    def test_bad_sub(self):
        for sub in ("", 5, None, ["a"]):
            self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                              mint({"sub": sub, "exp": 1_000_100}))

    def test_wrong_key(self):
        self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                          mint({"sub": "alice", "exp": 1_000_100}, key=OTHER))

    def test_alg_none(self):
        """
        An unsigned token (C{alg: none}) is refused.
        """
        token = (b64({"alg": "none", "typ": "JWT"}) + "."
                 + b64({"sub": "alice", "exp": 1_000_100}) + ".")
        self.assertRaises(TokenError, self.tokens.player_of_auth_token, token)
        token = mint({"sub": "alice", "exp": 1_000_100}, key=None,
                     algorithm="none")
        self.assertRaises(TokenError, self.tokens.player_of_auth_token, token)

    def test_other_hmac_alg(self):
        """
        Only HS256 is accepted, even signed with the right key.
        """
        for alg in ("HS384", "HS512"):
            token = mint({"sub": "alice", "exp": 1_000_100}, algorithm=alg)
            self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                              token)

    def test_tampered(self):
        token = mint({"sub": "alice", "exp": 1_000_100})
        head, _, sig = token.split(".")
        forged = head + "." + b64({"sub": "mallory", "exp": 1_000_100}) + "." + sig
        self.assertRaises(TokenError, self.tokens.player_of_auth_token, forged)

    def test_garbage(self):
        for token in ("", "x", "a.b.c", "....", "é"):
            self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                              token)

    def test_resume_token_is_not_an_auth_token(self):
        token = self.tokens.resume_token("alice")
        e = self.assertRaises(TokenError, self.tokens.player_of_auth_token,
                              token)
        self.assertIn("resume", str(e))


class ResumeTokenTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(5000)
        self.tokens = Tokens(SECRET, self.clock, resume_ttl=600)

    def test_round_trip(self):
        token = self.tokens.resume_token("alice")
        claims = self.tokens.check_resume_token(token, "alice")
        self.assertEqual(claims["sub"], "alice")
        self.assertEqual(claims["aud"], RESUME_AUDIENCE)
        self.assertEqual(claims["iat"], 5000)
        self.assertEqual(claims["exp"], 5600)

    def test_signed_hs256_with_secret(self):
        token = self.tokens.resume_token("alice")
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")
        jwt.decode(token, SECRET, algorithms=["HS256"],
                   audience=RESUME_AUDIENCE, options={"verify_exp": False})

    def test_expires_after_ttl(self):
        token = self.tokens.resume_token("alice")
        self.clock.advance(599)
        self.tokens.check_resume_token(token, "alice")
        self.clock.advance(1)
        self.assertRaises(TokenError, self.tokens.check_resume_token, token,
                          "alice")

    def test_revoked_before(self):
        """
        Tokens issued at or before a revocation time are refused; iat keeps
        the clock's precision so one issued just after is not.
        """
        token = self.tokens.resume_token("alice")
        self.clock.advance(0.25)
        later = self.tokens.resume_token("alice")
        self.tokens.check_resume_token(token, "alice", revoked_before=4999.9)
        for revoked in (5000, 5000.1):
            e = self.assertRaises(TokenError, self.tokens.check_resume_token,
                                  token, "alice", revoked_before=revoked)
            self.assertIn("revoked", str(e))
        self.tokens.check_resume_token(later, "alice", revoked_before=5000.1)

    def test_revoked_without_iat(self):
        token = mint({"sub": "alice", "exp": 9000, "aud": RESUME_AUDIENCE})
        self.tokens.check_resume_token(token, "alice")
        self.assertRaises(TokenError, self.tokens.check_resume_token, token,
                          "alice", revoked_before=0)

    def test_other_player(self):
        token = self.tokens.resume_token("alice")
        self.assertRaises(TokenError, self.tokens.check_resume_token, token,
                          "bob")

    def test_auth_token_is_not_a_resume_token(self):
        """
        A valid auth token (no audience) cannot resume.
        """
        token = mint({"sub": "alice", "exp": 9000})
        self.assertRaises(TokenError, self.tokens.check_resume_token, token,
                          "alice")

    def test_other_audience(self):
        token = mint({"sub": "alice", "exp": 9000, "aud": "something-else"})
        self.assertRaises(TokenError, self.tokens.check_resume_token, token,
                          "alice")

    def test_other_gate_secret(self):
        other = Tokens(OTHER, self.clock, resume_ttl=600)
        self.assertRaises(TokenError, self.tokens.check_resume_token,
                          other.resume_token("alice"), "alice")

    def test_shared_secret_across_gates(self):
        """
        Gates sharing C{auth.secret} accept each other's resume tokens.
        """
        other = Tokens(SECRET, self.clock, resume_ttl=600)
        self.tokens.check_resume_token(other.resume_token("alice"), "alice")

    def test_alg_none_resume(self):
        token = (b64({"alg": "none", "typ": "JWT"}) + "."
                 + b64({"sub": "alice", "exp": 9000, "aud": RESUME_AUDIENCE})
                 + ".")
        self.assertRaises(TokenError, self.tokens.check_resume_token, token,
                          "alice")
