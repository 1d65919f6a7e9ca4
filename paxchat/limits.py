"""The protocol's size limits, in one place so that a client can check a
request before sending it instead of learning the limit from a closed
connection.

The values are those of docs/protocol.md; the server and the state
enforce them from here too.
"""

import re

__all__ = ["MAX_ANSWER_MESSAGE_BYTES", "MAX_BODY_CHARS", "MAX_LIMIT", "MAX_LINE_BYTES", "MAX_PASSWORD_BYTES",
           "MIN_PASSWORD_BYTES", "PATTERN", "USERNAME"]

# A request line (UTF-8, without its "\n") longer than this gets
# `frame_too_large` and the connection is closed.
MAX_LINE_BYTES = 65536

# A message body holds at most this many characters (code points).
MAX_BODY_CHARS = 16384

# A `history` or `read_messages` answer stops listing messages once they
# weigh this much as the server writes them (escaped to ASCII: up to 12
# bytes a character). At least one message is always listed.
MAX_ANSWER_MESSAGE_BYTES = 1 << 20

# `limit` of every op is 1 to this.
MAX_LIMIT = 1000

# A username: what the server accepts, and what the clients check before asking for a password.
USERNAME = re.compile(r"[A-Za-z0-9_.\-]{1,32}")

# A password: this many bytes of UTF-8, what the server accepts and what the
# clients check before asking for it again.
MIN_PASSWORD_BYTES = 8
MAX_PASSWORD_BYTES = 1024

# A `list_accounts` pattern: 1 to 64 username characters and the wildcards.
PATTERN = re.compile(r"[A-Za-z0-9_.\-*?]{1,64}")
