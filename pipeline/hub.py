"""Is the Hugging Face Hub reachable? Asked once, fast, before anything tries to download.

Without this check an offline machine meets transformers' and datasets' retries (dozens
of lines over most of a minute) before their last line says what is wrong. A TCP
connection to the endpoint answers in milliseconds either way.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

OFFLINE_VALUES = {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE_VALUES:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
