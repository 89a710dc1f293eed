"""Keeping credentials out of everything the pipeline writes or shows: logs, manifests, artifacts, flow parameters.

Credentials reach the pipeline two ways: inside URLs (``https://user:password@host/...``, signed-URL query
parameters) and inside storage options (a ``token`` dict, an ``endpoint_url`` with a password, a ``secret``).
``redact`` masks both kinds in any text; ``hide_options`` wraps storage options so that Prefect stores and
shows them as ``**********`` while the code that needs them can still unwrap them with ``reveal_options``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Secret, SecretStr

MASK = "***"
# Option and query-parameter names whose values are credentials (matched as substrings, case-insensitive).
SENSITIVE_NAMES = ("token", "secret", "password", "passwd", "credential", "signature", "key", "auth", "sig",
                   "sas", "session")
_USERINFO = re.compile(r"(?<![a-zA-Z0-9+.\-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://)(?P<userinfo>[^/@\s?#]+)@")
_QUERY_PARAMETER = re.compile(r"(?P<name>[?&;](?P<key>[^=&#\s]+)=)(?P<value>[^&#\s]*)")


class StorageSecrets(SecretStr):
    """Storage options (as JSON) in a pydantic secret string: whatever serialises it for Prefect (flow-run
    parameters, the deployment form, logs) gets ``**********``. A plain pydantic ``Secret[dict]`` would not do:
    Prefect's JSON encoder writes out its inner value."""


def is_sensitive(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SENSITIVE_NAMES)


def secret_values(options: Any, _inside_sensitive: bool = False) -> list[str]:
    """Every string in ``options`` that is, or sits under, a sensitive key; plus passwords inside URL values."""
    found: list[str] = []
    if isinstance(options, (Secret, SecretStr)):
        options = reveal_options(options)
    if isinstance(options, dict):
        for name, value in options.items():
            found += secret_values(value, _inside_sensitive or is_sensitive(str(name)))
    elif isinstance(options, (list, tuple)):
        for value in options:
            found += secret_values(value, _inside_sensitive)
    elif isinstance(options, str):
        if _inside_sensitive and len(options) >= 4 and options not in ("anon", "google_default", "cache", "cloud"):
            found.append(options)
        found += [match.group("userinfo") for match in _USERINFO.finditer(options)]
    return found


def redact(text: Any, options: Any = None, queries: bool = True) -> str:
    """``text`` with URL credentials, sensitive query parameters (unless ``queries`` is off: a file path has
    none, and ``x?sig=1.jpg`` is a file's name) and the secret values of ``options`` masked."""
    text = str(text)
    for value in sorted(set(secret_values(options)), key=len, reverse=True):
        text = text.replace(value, MASK)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    if not queries:
        return text
    return _QUERY_PARAMETER.sub(
        lambda m: m.group("name") + (MASK if is_sensitive(m.group("key")) and _in_query(m) else m.group("value")),
        text,
    )


def _in_query(match: re.Match) -> bool:
    """Whether a ``[?&;]name=value`` match is a URL's parameter: it opens a query, or comes after the "?" of the
    URL (or word) it is in, or is in a web URL at all (``;jsessionid=`` in its path). Elsewhere "&" and ";" are
    parts of a name ("cam;key=front.jpg" in a folder or a bucket), which must stay as it is."""
    text, at = match.string, match.start()
    if text[at] == "?":
        return True
    scheme = text.rfind("://", 0, at)
    word = max(text.rfind(space, 0, at) for space in " \t\n") + 1
    if scheme >= word and text[max(word, scheme - 5):scheme].lower().endswith(("http", "https")):
        return True
    return "?" in text[scheme if scheme >= 0 else word:at]


def hide_options(options: dict | StorageSecrets | None) -> StorageSecrets | None:
    if options is None or isinstance(options, StorageSecrets):
        return options
    try:
        return StorageSecrets(json.dumps(dict(options)))
    except TypeError:
        raise ValueError("storage options must be JSON values (strings, numbers, lists, objects)") from None


def reveal_options(options: dict | SecretStr | str | None) -> dict:
    """The storage options as a dict, from a dict, hidden options, or their JSON text (e.g. typed into a form)."""
    if options is None:
        return {}
    if isinstance(options, SecretStr):
        options = options.get_secret_value()
    if isinstance(options, str) and options.strip() and set(options.strip()) == {"*"}:
        raise ValueError("the storage options of this run were recorded masked ('**********'), so a retry of it "
                         "cannot read them back: give them again (the same stylize command, or retry-failed with "
                         "storage_options), or keep them in a Prefect Secret block and name it in "
                         "storage_secret_block")
    if isinstance(options, str):
        try:
            options = json.loads(options) if options.strip() else {}
        except ValueError:
            raise ValueError("storage options must be a JSON object") from None
    if not isinstance(options, dict):
        raise ValueError("storage options must be a JSON object")
    return dict(options)


def with_secret_block(options: dict | SecretStr | str | None, block_name: str | None) -> StorageSecrets | None:
    """The storage options, hidden, with those of the Prefect Secret block ``block_name`` (a JSON object) under them:
    a run given a block name records only the name, and a retried run reads the block again."""
    given = reveal_options(options)  # refuses options a retried run only has masked
    if not block_name:
        return None if options is None else hide_options(given)
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as error:
        raise ValueError(f"cannot read the Prefect Secret block {block_name!r}: {error}") from None
    try:
        from_block = reveal_options(value if isinstance(value, (str, dict)) else json.dumps(value))
    except ValueError:
        raise ValueError(f"the Prefect Secret block {block_name!r} must hold the storage options as a JSON "
                         "object") from None
    return hide_options({**from_block, **given})
