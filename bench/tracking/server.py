"""The tracking server seen from here: is a URI a server, does it answer now, did an error mean it did not
answer, and URLs with their passwords hidden."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:]*)(:(?P<password>[^/@]*))?@")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(text: str) -> str:
    """Hide the password of any URL in `text` (`postgresql://u:secret@h/db` -> `postgresql://u:***@h/db`)."""
    return _USERINFO.sub(
        lambda m: f"{m['scheme']}{m['user']}{':***' if m['password'] is not None else ''}@", text
    )


def server_answers(uri: str) -> bool:
    """Whether a tracking server answers its health check now (one quick try, no retries); stores that
    are not servers always do."""
    if not is_server(uri):
        return True
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=5).status_code == 200
    except requests.exceptions.RequestException:
        return False


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow error means the server did not answer (connection refused or cut, timeout, 5xx
    through all of MLflow's retries), as opposed to an answer that refused the request."""
    import requests

    no_answer = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
    )
    seen: BaseException | None = error
    for _ in range(10):  # MLflow wraps the requests error (as cause or context)
        if seen is None:
            return False
        if isinstance(seen, no_answer):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
