"""The one place secrets are taken out of text before it is printed or logged."""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"token|secret|password|passwd|api_key|apikey|credential", re.IGNORECASE)
MASK = "***"
_PATTERNS = [
    (re.compile(r"(?<=://)([^/\s:@]+):[^/\s@]*@"), rf"\1:{MASK}@"),  # scheme://user:password@host
    (re.compile(r"(?<=://)[^/\s:@]+@"), f"{MASK}@"),  # scheme://token@host
    (re.compile(r"([?&;][^=&\s#]*(?:token|secret|password|passwd|key|sig|credential)[^=&\s#]*=)[^&\s#'\"]+",
                re.IGNORECASE), rf"\1{MASK}"),  # ?access_token=... in query strings
    (re.compile(r"\b(?:dapi|hf_)[A-Za-z0-9]{20,}"), MASK),  # Databricks and Hugging Face tokens
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+"), rf"\1{MASK}"),
]


def secret_values() -> set[str]:
    """Values of env vars whose names look secret (tokens, passwords): never to be shown."""
    return {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 4}


def redact_text(text: str) -> str:
    """`text` with every URI password, token-looking value and secret env value masked, everywhere."""
    for secret in sorted(secret_values(), key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
