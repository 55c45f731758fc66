from twisted.application.service import ServiceMaker

mmogate = ServiceMaker(
    "mmogate", "gate.tap",
    "A game gateway: client sessions over TCP and WebSocket in front of "
    "HTTP game backends.",
    "mmogate")
