"""Fast, clear errors for hub ids that cannot be used, raised before transformers or datasets retry for a minute."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 5.0
_probe_result: dict[str, str | None] = {}


class HubUnavailableError(RuntimeError):
    """A hub model or dataset that is not cached locally and cannot be downloaded."""


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_problem() -> str | None:
    """Return why the hub cannot be reached (offline mode, no DNS, no route), or None when it can."""
    if _offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint in _probe_result:
        return _probe_result[endpoint]
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    # getaddrinfo has no timeout of its own, so the probe runs in a thread that is abandoned after the limit.
    def probe():
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                outcome.append(None)
        except OSError as err:
            outcome.append(f"{host} could not be reached ({err.strerror or err})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1)
    problem = outcome[0] if outcome else f"{host} did not answer within {PROBE_TIMEOUT_S:.0f} s"
    _probe_result[endpoint] = problem
    return problem


def _cached_model(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def use_offline_mode() -> None:
    """Switch huggingface_hub, transformers and datasets to offline mode for the rest of this process.

    Called once the hub is known to be unreachable: a cached model or dataset then loads at once instead of
    after a minute of retries, each printed as a warning.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    # A module imported earlier read the variable at import time and keeps the flag as a module attribute.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def require_model(value: str, role: str) -> None:
    """Raise HubUnavailableError unless ``value`` is a local directory, a cached hub model or a reachable hub id."""
    if Path(value).is_dir():
        return
    # A hub id is "name" or "owner/name"; anything else can only be a directory.
    resolved = str(Path(value).expanduser().resolve())
    looked_in = "" if resolved == value else f" (looked for {resolved!r})"
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise HubUnavailableError(f"{role} directory {value!r} not found{looked_in}")
    problem = hub_problem()
    if problem is None:
        return
    use_offline_mode()
    if _cached_model(value):
        return
    raise HubUnavailableError(
        f"{role} {value!r} is neither an existing local directory{looked_in} nor a reachable hub model ({problem}); "
        f"set {role} to a local model directory (for offline stand-ins see `python -m hdkd standins --help`)"
    )


def require_dataset(dataset: str, config_name: str = "raw") -> None:
    """Raise HubUnavailableError when the hub dataset cannot be downloaded and is not in the local cache."""
    problem = hub_problem()
    if problem is None:
        return
    use_offline_mode()
    try:
        import datasets

        datasets.load_dataset_builder(dataset, config_name, download_mode="reuse_cache_if_exists")
        return
    except Exception:  # noqa: BLE001 - not cached: report below with the fix
        pass
    raise HubUnavailableError(
        f"hub dataset {dataset!r} cannot be downloaded ({problem}); set data.train_file and data.validation_file "
        "to local JSON-lines files in the AQuA-RAT schema instead"
    )
