"""
The game-backend side of mmogate.

C{backend.reference} is the bundled reference backend (PROTOCOL.md section 4)
a gate runs in-process when no C{backend.url} is set; C{backend.pushclient}
is the helper backend authors use to call a gate's push API (section 5);
C{backend.signing} is the body signature both sides agree on.
"""
