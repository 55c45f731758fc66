"""
End-to-end tests of the Python client library (L{gate.client.GateClient})
against a real gate over 127.0.0.1: the library's reconnect, resume,
dedupe and acks, driven through real drops.
"""

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from gate.client import GateClient, GateError
from tests.e2e import HTTP, TIMEOUT, start_gate, until, within


class ClientLibraryTests(TestCase):
    async def client(self, gate, transport, name, **kw):
        host, port = gate.address(transport)
        addr = f"tcp://{host}:{port}" if transport == "tcp" \
            else f"ws://{host}:{port}/ws"
        pushes, states = [], []
        client = GateClient(reactor, addr, login={"name": name},
                            on_push=pushes.append,
                            on_state=lambda state, info: states.append(state),
                            max_backoff=0.5, **kw)
        self.addCleanup(lambda: within(client.close(), TIMEOUT,
                                       "the client to close"))
        await within(client.connect(), TIMEOUT, f"{name} to log in")
        return client, pushes, states

    def session_of(self, gate, player_id):
        return gate.players.get(player_id).session

    async def resume_after_drop(self, transport):
        """
        Pushes sent while the connection is down reach the application once
        each, in order, after the library reconnects and resumes by itself;
        its acks then empty the mailbox.
        """
        gate = start_gate(self)
        api = HTTP(self, gate)
        client, pushes, states = await self.client(gate, transport, "alice")
        for n in (1, 2):
            await api.post("/v1/push", {"players": ["alice"], "route": "n",
                                        "data": n})
        await until(lambda: len(pushes) == 2, "two live pushes")
        # Drop the connection from the gate's side, as a network would.
        self.session_of(gate, "alice").connection.abort()
        await until(lambda: gate.players.get("alice").session is None,
                    "the gate to see the drop")
        for n in (3, 4, 5):
            code, answer, _ = await api.post(
                "/v1/push", {"players": ["alice"], "route": "n", "data": n})
            self.assertEqual(answer["queued"], 1)
        await until(lambda: len(pushes) == 5, "the queued pushes after resume")
        await api.post("/v1/push", {"players": ["alice"], "route": "n",
                                    "data": 6})
        await until(lambda: len(pushes) == 6, "a live push after resume")
        self.assertEqual([(p.seq, p.data) for p in pushes],
                         [(n, n) for n in range(1, 7)])
        self.assertIn("resumed", states)
        self.assertEqual(client.last_seq, 6)
        self.assertEqual(await client.request("echo", {"after": "resume"}),
                         {"after": "resume"})

        async def mailbox_empty():
            code, info, _ = await api.get("/v1/players/alice")
            return info["mailbox"] == 0

        await until(mailbox_empty, "the client's acks to empty the mailbox")

    def test_resume_after_drop_tcp(self):
        return self.resume_after_drop("tcp")

    def test_resume_after_drop_ws(self):
        return self.resume_after_drop("ws")

    async def test_errors_and_chat(self):
        """
        Errors arrive as L{GateError}s with the gate's code; a chat message
        from one client reaches the other through the backend and push API.
        """
        gate = start_gate(self)
        alice, alice_pushes, _ = await self.client(gate, "tcp", "alice")
        bob, _, _ = await self.client(gate, "ws", "bob")
        e = await self.assertFailure(bob.request("nope", {}), GateError)
        self.assertEqual(e.code, "route_not_found")
        e = await self.assertFailure(bob.request("fail", {}), GateError)
        self.assertEqual(e.code, "backend_error")
        answer = await bob.request("say", {"to": "alice", "text": "hi"})
        self.assertEqual(answer["delivered"], 1)
        await until(lambda: alice_pushes, "alice's chat push")
        self.assertEqual((alice_pushes[0].route, alice_pushes[0].data),
                         ("chat", {"from": "bob", "text": "hi"}))

    async def test_shutdown_kick_reconnects(self):
        """
        A gate restart (kick C{shutdown}) is recovered from: the library
        reconnects to the new gate on the same address and logs in afresh
        (the new gate does not know the player), reporting it.
        """
        gate = start_gate(self)
        host, port = gate.address("tcp")
        client, _, states = await self.client(gate, "tcp", "carol")
        await within(gate.stopService(), TIMEOUT, "the gate to stop")
        second = start_gate(self, listen={"tcp": f"tcp:{port}:interface={host}"})
        await until(lambda: "resume_failed" in states
                    and states[-1] == "logged_in",
                    "carol logged in on the new gate")
        self.assertIsNotNone(second.players.get("carol").session)
        self.assertEqual(await client.request("echo", 7), 7)
