"""What a command does when whoever reads its output goes away (``paxchat ... | head``).

What the reader wanted, it has: the command ends quietly, with no traceback.
Python flushes standard output once more on exit; pointed at /dev/null,
that flush cannot fail again and print "Exception ignored".
"""

import os

__all__ = ["discard"]


def discard(stream):
    """Send what ``stream`` still buffers, and anything written to it later, to /dev/null."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
