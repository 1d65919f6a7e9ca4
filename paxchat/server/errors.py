"""The protocol's error codes, and the exception handlers raise to answer with one."""

INVALID_REQUEST = "invalid_request"
UNKNOWN_OP = "unknown_op"
NOT_LOGGED_IN = "not_logged_in"
UNAVAILABLE = "unavailable"
RATE_LIMITED = "rate_limited"
FRAME_TOO_LARGE = "frame_too_large"
INTERNAL = "internal"
INVALID_USERNAME = "invalid_username"
INVALID_PASSWORD = "invalid_password"
USERNAME_TAKEN = "username_taken"
BAD_CREDENTIALS = "bad_credentials"
BAD_SESSION = "bad_session"
NO_SUCH_USER = "no_such_user"
BODY_TOO_LARGE = "body_too_large"
# An op the node knows that the cluster does not apply yet: some node still
# runs an earlier build (docs/deploy.md, Upgrading).
UPGRADE_IN_PROGRESS = "upgrade_in_progress"


class ProtocolError(Exception):
    """Answer the request with ``{"code": code, "message": message}``."""

    def __init__(self, code, message):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def as_error(self):
        return {"code": self.code, "message": self.message}
