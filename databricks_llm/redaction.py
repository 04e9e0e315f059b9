"""The one place secrets are taken out of text before it is printed or logged.

`redact_text` masks by value (the values of environment variables whose names say secret:
tokens, passwords, keys) and by shape (credentials in URIs, token-looking strings). `install`
applies it to everything the process prints or logs: every logging handler (the root's, MLflow's,
the libraries', and those made later) and sys.stdout/sys.stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

# A name part (between `_`, `.`, `-` or the ends) that says secret: HF_TOKEN, MLFLOW_TRACKING_PASSWORD,
# AWS_SECRET_ACCESS_KEY, hub_token; not TOKENIZERS_PARALLELISM or include_tokens_per_second.
SECRET_NAME = re.compile(r"(?:^|[_.\-])(?:token|secret|password|passwd|api_?key|access_?key|credentials?)"
                         r"(?:$|[_.\-])", re.IGNORECASE)
MASK = "***"
# Values of secret-named variables that are settings, not secrets (HF_HUB_DISABLE_IMPLICIT_TOKEN=1):
# masking them would mask every `true` and `1` in unrelated text.
_EVERYDAY = re.compile(r"(?i)true|false|yes|no|on|off|none|null|\d{1,7}")
MIN_SECRET_LENGTH = 6
_PATTERNS = [
    (re.compile(r"(?<=://)([^/\s:@]+):[^/\s@]*@"), rf"\1:{MASK}@"),  # scheme://user:password@host
    (re.compile(r"(?<=://)[^/\s:@]+@"), f"{MASK}@"),  # scheme://token@host
    (re.compile(r"([?&;][^=&\s#]*(?:token|secret|password|passwd|key|sig|credential)[^=&\s#]*=)[^&\s#'\"]+",
                re.IGNORECASE), rf"\1{MASK}"),  # ?access_token=... in query strings
    (re.compile(r"\b(?:dapi|hf_)[A-Za-z0-9]{20,}"), MASK),  # Databricks and Hugging Face tokens
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+"), rf"\1{MASK}"),
]


def secret_values() -> set[str]:
    """Values of env vars whose names look secret (tokens, passwords): never to be shown. Short
    values and everyday ones (`true`, `0`) are settings, not secrets, and are left alone."""
    return {v for k, v in os.environ.items()
            if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH and not _EVERYDAY.fullmatch(v.strip())}


def redact_text(text: str) -> str:
    """`text` with every URI password, token-looking value and secret env value masked, everywhere."""
    for secret in sorted(secret_values(), key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """`record` with its message, exception and stack text rendered and redacted (idempotent)."""
    if getattr(record, "_redacted", False):
        return record
    try:
        record.msg, record.args = redact_text(record.getMessage()), None
    except Exception:  # a malformed %-format: logging reports it itself, leave the record as it is
        return record
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    record._redacted = True
    return record


class SecretFilter(logging.Filter):
    """Masks secrets in every record a handler emits; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class RedactingStream:
    """A text stream that masks secrets in what is written to it (print, tracebacks, warnings)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


FILTER = SecretFilter()


def install() -> None:
    """Mask secrets in all the process's output from now on: the filter on every handler that exists
    (the root's and every named logger's), a record factory for handlers made later, and redacting
    sys.stdout/sys.stderr. Calling it again adds nothing."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in logger.handlers:
            if FILTER not in handler.filters:
                handler.addFilter(FILTER)
    make_record = logging.getLogRecordFactory()
    if not getattr(make_record, "_redacting", False):
        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(make_record(*args, **kwargs))

        redacting_factory._redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(redacting_factory)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
