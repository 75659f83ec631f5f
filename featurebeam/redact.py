"""Keeping credentials out of what featurebeam writes: run.json, dead letters and logs.

Two tools. `redact_options` takes the Beam options dict that run.json records and replaces the
value of every option whose name says it holds a secret (`s3_secret_access_key`,
`azure_connection_string`, anything with token, password, secret, credential, private or access
key in its name) by `<redacted>`, keeping the name so a reader still sees it was set; every other
string is scrubbed. `scrub` takes any text (an exception message, a URI, a log line) and masks
what looks like a credential wherever it appears: PEM private keys, the secret fields of a key or
ADC JSON file, bearer and OAuth tokens, JWTs, API and AWS keys, passwords in URLs, and
`name=value` pairs whose name is secret-like (signed-URL signatures included). Identities are not
secrets and stay: a `--service_account_email`, a project, a bucket, a KMS key's resource name.

The patterns are deliberately specific: a message that merely mentions "token" keeps its text.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

REDACTED = "<redacted>"

# Option names that hold secrets. Checked as words of the snake_case name, so `no_auth`,
# `gcp_oauth_scopes`, `dataflow_kms_key` and `service_account_email` are not matched.
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:secret|password|passwd|token|credentials?|private_key|access_key|api_key|apikey|"
    r"connection_string|session_token|signature|key_file|keyfile)(?:_|$)",
    re.IGNORECASE,
)
_SECRET_JSON_FIELDS = "private_key|private_key_id|client_secret|refresh_token|access_token|id_token|token|password|secret"
_SECRET_PARAM_WORDS = (
    "token", "secret", "password", "passwd", "pwd", "signature", "sig", "credential", "apikey", "api_key", "accesskey",
    "access_key", "accountkey", "account_key", "sharedaccesskey", "shared_access_key",
)
_SECRET_PARAM = rf"[\w.-]*(?:{'|'.join(_SECRET_PARAM_WORDS)})"
# (pattern, replacement, triggers): a pattern is tried only when the lower-cased text holds one of
# its triggers, so the common message, which holds none, costs a few substring searches.
_PATTERNS: tuple[tuple[re.Pattern, str, tuple[str, ...]], ...] = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL), REDACTED,
     ("private key",)),
    # "private_key": "...", also with escaped quotes inside a JSON string inside a message.
    (re.compile(rf"(\\?[\"'](?:{_SECRET_JSON_FIELDS})\\?[\"']\s*:\s*)(\\?[\"'])(?:[^\"'\\]|\\.)*?\2", re.IGNORECASE),
     rf"\1\2{REDACTED}\2", tuple(f + q for f in _SECRET_JSON_FIELDS.split("|") for q in ('"', "'", '\\"'))),
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), rf"\1 {REDACTED}", ("bearer", "basic")),
    (re.compile(r"\bya29\.[0-9A-Za-z_.\-]+"), REDACTED, ("ya29.",)),  # Google OAuth access token
    (re.compile(r"\b1//[0-9A-Za-z_\-]{20,}"), REDACTED, ("1//",)),  # Google OAuth refresh token
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), REDACTED, ("eyj",)),  # JWT
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}"), REDACTED, ("aiza",)),  # Google API key
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED, ("akia", "asia")),  # AWS access key id
    (re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{20,})"), REDACTED, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),  # GitHub
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@", re.IGNORECASE), rf"\1{REDACTED}@", ("@",)),  # user:pass@
    (re.compile(rf"(?<![\w.-])({_SECRET_PARAM})=([^&\s,;'\"<>]+)", re.IGNORECASE), rf"\1={REDACTED}",
     tuple(f"{word}=" for word in _SECRET_PARAM_WORDS)),
)


def scrub(text: str) -> str:
    """`text` with everything that looks like a credential replaced by `<redacted>`."""
    if not text or not isinstance(text, str):
        return text
    lower = text.lower()
    for pattern, replacement, triggers in _PATTERNS:
        if any(t in lower for t in triggers):
            text = pattern.sub(replacement, text)
            lower = text.lower()
    return text


def scrub_value(value: Any) -> Any:
    """`scrub` applied to every string inside lists, tuples and dicts (keys kept)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v) for v in value)
    return value


def is_secret_option(name: str) -> bool:
    """Whether a pipeline option's name says its value is a secret (`s3_secret_access_key`: yes)."""
    return bool(_SECRET_NAME.search(name.lstrip("-")))


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a Beam options dict (`PipelineOptions.get_all_options()`) safe to write down.

    Secret-named options keep their name with the value `<redacted>` (None and False stay, they
    reveal nothing); every other value is scrubbed.
    """
    out = {}
    for name, value in options.items():
        if is_secret_option(str(name)) and value not in (None, False, "", [], {}):
            out[name] = REDACTED
        else:
            out[name] = scrub_value(value)
    return out


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs every record's message (arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def scrub_logs(logger: logging.Logger | None = None) -> None:
    """Add a ScrubFilter to every handler of `logger` (default the root logger), once.

    On handlers, not the logger, because a logger's filters do not see records that propagate
    from child loggers (Beam's, google-auth's).
    """
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
