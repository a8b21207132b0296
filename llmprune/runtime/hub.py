"""Is the Hugging Face Hub reachable? One quick look before a download, so that a machine without a network
fails at once with one line instead of after the Hub client's retries (about 30 s of warnings, each printed
twice). A leaf: it imports nothing of the package."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT = 3.0  # seconds to open a connection to the Hub


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set: the libraries read their caches and never retry."""
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the Hub cannot be reached now (``"huggingface.co: Name or service not known"``), or None when a
    connection opens, or in offline mode (the caches answer then). The endpoint is ``HF_ENDPOINT``'s."""
    if offline_mode():
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None


@contextlib.contextmanager
def hub_offline(active: bool = True) -> Iterator[None]:
    """Within: the Hub libraries in offline mode (what ``HF_HUB_OFFLINE=1`` gives), so a read from the local
    cache makes no request at all (``local_files_only`` alone still leaves transformers asking the Hub for an
    adapter config, and the client retrying for 30 s). Restored on the way out; ``active=False`` changes nothing."""
    if not active:
        yield
        return
    import huggingface_hub.constants as constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
