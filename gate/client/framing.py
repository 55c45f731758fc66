"""
Client side of the TCP framing: the gate's own L{gate.framing}, with a
client-sized default limit.
"""

from gate.framing import HEADER_SIZE, FrameDecoder as _FrameDecoder
from gate.framing import FrameTooLarge, frame

__all__ = ["DEFAULT_MAX_FRAME", "HEADER_SIZE", "FrameDecoder",
           "FrameTooLarge", "frame"]

#: Largest payload the client accepts by default. The gate's limit on what
#: it sends is policy, not contract, so the client is generous but bounded.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class FrameDecoder(_FrameDecoder):
    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        _FrameDecoder.__init__(self, max_frame)
