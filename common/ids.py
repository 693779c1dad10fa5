"""The form of an org id and of a ZEN pool's name: one pattern for the CA (which refuses any
other before a lookup), the ZEN (which asks the CA about no name of another form), the admin
command line, and the CRDs' OpenAPI schemas (a test holds those to it).

3 to 63 characters: lowercase letters, digits and '-', starting with a letter and not ending
with '-'. It is a DNS label, so a pool's name can name Kubernetes objects, and it carries no
character that needs quoting in a log line, a metric label or a SPIFFE id.
"""

from __future__ import annotations

import re

ID_PATTERN = r"[a-z][a-z0-9-]{1,61}[a-z0-9]"
ID_RE = re.compile(ID_PATTERN)  # always fullmatch: "$" would accept a trailing newline
ID_RULE = "3-63 lowercase letters, digits or '-', starting with a letter and not ending with '-'"
"""The pattern in words, for error messages."""


def is_id(value: str) -> bool:
    return ID_RE.fullmatch(value or "") is not None
