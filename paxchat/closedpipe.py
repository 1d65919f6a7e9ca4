"""What a command does when whoever reads its output goes away (``paxchat ... | head``).

What the reader wanted, it has: the command ends quietly, with no traceback,
and with the exit status of what it did, not of the pipe: ``paxchat-admin
status | grep -q leader`` under ``set -o pipefail`` fails only when a node
is down. Python flushes standard output once more on exit; pointed at
/dev/null, that flush cannot fail again and print "Exception ignored".
"""

import os

__all__ = ["ReaderMayLeave", "discard"]


class ReaderMayLeave:
    """A text stream to write to until its reader goes away, and to /dev/null after."""

    def __init__(self, stream):
        self.stream = stream
        self.left = False

    def write(self, text):
        if not self.left:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._leave()
        return len(text)

    def flush(self):
        if not self.left:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._leave()

    def _leave(self):
        self.left = True
        discard(self.stream)


def discard(stream):
    """Send what ``stream`` still buffers, and anything written to it later, to /dev/null."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
