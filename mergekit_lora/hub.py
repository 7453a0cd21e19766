"""Hugging Face Hub: pull adapters (``org/name[/subfolder][@revision]``) and push merged outputs.

Everything goes through ``huggingface_hub`` (cache, revisions, tokens).  Environment variables are
read at call time (``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME``, ``HF_ENDPOINT``)
rather than at import time, so a process can change them between calls.  The token is passed to
the client and never printed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoraMergeError

ADAPTER_PATTERNS = ["adapter_config.json", "*.safetensors", "README.md"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
_TRUE = {"1", "true", "yes", "on"}
_REPO_PART = re.compile(r"^[\w.-]+$")


@dataclass(frozen=True)
class HubId:
    """A parsed Hub source: ``repo_id`` (org/name), optional ``subfolder`` and ``revision``."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.subfolder}" if self.subfolder else "") + (
            f"@{self.revision}" if self.revision else "")


def parse_hub_id(source: str) -> HubId | None:
    """``org/name``, ``org/name@rev``, ``org/name/subfolder[@rev]`` -> HubId; None for anything that
    looks like a local path (``./x``, ``/x``, ``~``, more than two slashes, file suffixes)."""
    if not source or source[0] in "./~\\" or "\\" in source or "://" in source:
        return None
    path, at, revision = source.partition("@")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts) or "@" in revision or (at and not revision):
        return None
    if not all(_REPO_PART.match(p) for p in parts) or parts[-1].endswith((".safetensors", ".bin", ".pt")):
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id("/".join(parts[:2]))
    except HFValidationError:
        return None
    return HubId("/".join(parts[:2]), parts[2] if len(parts) == 3 else None, revision or None)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def cache_dir() -> str | None:
    """The cache folder the environment asks for now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def env_token() -> str | None:
    """``HF_TOKEN`` (or the legacy ``HUGGING_FACE_HUB_TOKEN``), else the token saved by ``hf auth login``."""
    tok = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if tok:
        return tok
    from huggingface_hub import get_token

    return get_token()


def download(hub: HubId, *, allow_pickle: bool = False) -> tuple[Path, dict[str, Any]]:
    """Fetch the adapter files of ``hub`` into the cache; return the local folder and meta extras."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ADAPTER_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    if hub.subfolder:
        patterns = [f"{hub.subfolder}/{p}" for p in patterns]
    from huggingface_hub import constants

    offline = _env_flag("HF_HUB_OFFLINE") or constants.is_offline_mode()
    try:
        folder = snapshot_download(
            hub.repo_id, revision=hub.revision, allow_patterns=patterns, cache_dir=cache_dir(),
            local_files_only=offline, token=os.environ.get("HF_TOKEN") or None, endpoint=endpoint(),
        )
    except GatedRepoError:
        raise LoraMergeError(
            f"{hub}: the repo is gated; accept its terms on the Hub and set HF_TOKEN to a token with access"
        ) from None
    except RepositoryNotFoundError:
        raise LoraMergeError(
            f"{hub}: no such repo on the Hub (or it is private and HF_TOKEN is missing or lacks access)"
        ) from None
    except RevisionNotFoundError:
        raise LoraMergeError(f"{hub}: the repo has no revision {hub.revision!r}; use a branch, tag or commit") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if offline:
            raise LoraMergeError(
                f"{hub}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once "
                "online or unset HF_HUB_OFFLINE"
            ) from None
        raise LoraMergeError(f"{hub}: the Hub cannot be reached and the repo is not cached; check the network") from None
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code in (401, 403):
            raise LoraMergeError(f"{hub}: access denied by the Hub (HTTP {code}); set HF_TOKEN to a token "
                                 "with read access") from None
        raise LoraMergeError(f"{hub}: the Hub answered HTTP {code}; try again later") from None
    except _transport_errors() as e:  # connection errors the library did not turn into LocalEntryNotFoundError
        raise LoraMergeError(f"{hub}: downloading failed: {_network_problem(e)}") from None
    snapshot = Path(folder)
    local = snapshot / hub.subfolder if hub.subfolder else snapshot
    found = [p for p in (local.iterdir() if local.is_dir() else []) if p.is_file()
             and (p.name == "adapter_config.json" or p.suffix == ".safetensors"
                  or (allow_pickle and p.suffix in (".bin", ".pt", ".pth", ".ckpt")))]
    if not found:
        where = f"folder {hub.subfolder!r} of " if hub.subfolder else ""
        raise LoraMergeError(
            f"{hub}: no adapter files (adapter_config.json, *.safetensors) in the {where}repo {hub.repo_id}"
            + ("" if allow_pickle else "; pickle files are skipped unless «allow_pickle»")
        )
    return local, {"resolved_revision": snapshot.name, "hub_repo": hub.repo_id}


def resolve_hub(source: str, *, allow_pickle: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """Hub ids are downloaded (or found in the cache); None for anything that is not a Hub id."""
    hub = parse_hub_id(source)
    if hub is None:
        return None
    return download(hub, allow_pickle=allow_pickle)


def require_token() -> str:
    """The write token, or a clear error before any work is done."""
    tok = env_token()
    if not tok:
        raise LoraMergeError("pushing to the Hub needs a token: set HF_TOKEN (a write token) or run `hf auth login`")
    return tok


def check_repo_id(repo_id: str, where: str = "repo id") -> None:
    hub = parse_hub_id(repo_id)
    if hub is None or hub.subfolder or hub.revision:
        raise LoraMergeError(f"{where} {repo_id!r} is not a Hub repo id; use org/name")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (a merged adapter with its card); return the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise LoraMergeError(f"{folder}: no such folder; push a folder written by `loramerge merge` or `run`")
    if not (folder / "README.md").is_file():
        raise LoraMergeError(f"{folder}: no README.md model card; push a folder written by `loramerge merge` or `run`")
    if not any(folder.glob("*.safetensors")):
        raise LoraMergeError(f"{folder}: no .safetensors adapter file to push")
    token = require_token()
    if _offline():
        raise LoraMergeError(f"pushing to {repo_id} needs the network but HF_HUB_OFFLINE is set; unset it to push")
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or "Upload merged LoRA (mergekit-lora)",
                                 ignore_patterns=[".*", "*.tmp"])
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        hint = "check that HF_TOKEN has write access to it" if code in (401, 403) else "try again later"
        raise LoraMergeError(f"pushing to {repo_id} failed: the Hub answered HTTP {code}; {hint}") from None
    except OfflineModeIsEnabled:
        raise LoraMergeError(f"pushing to {repo_id} needs the network but HF_HUB_OFFLINE is set; unset it to push"
                             ) from None
    except _transport_errors() as e:
        raise LoraMergeError(f"pushing to {repo_id} failed: {_network_problem(e)}") from None
    return str(info.commit_url)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection, timeout and protocol errors of whichever HTTP client huggingface_hub uses."""
    import importlib

    errs: list[type[BaseException]] = [OSError]
    for mod in ("httpx2", "httpx", "requests"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        errs.append(getattr(m, "TransportError", None) or getattr(m, "RequestException", OSError))
    return tuple(errs)


def _offline() -> bool:
    from huggingface_hub import constants

    return _env_flag("HF_HUB_OFFLINE") or bool(constants.is_offline_mode())


def _network_problem(e: BaseException) -> str:
    """One clause for a transport error (no URL dump, no token): what happened and what to do."""
    name = type(e).__name__
    where = endpoint() or "https://huggingface.co"
    if "Timeout" in name:
        return f"the Hub at {where} did not answer in time ({name}); check the network and try again"
    if "Connect" in name or "Connection" in name or "Protocol" in name or isinstance(e, ConnectionError):
        return f"the Hub at {where} cannot be reached ({name}); check the network or HF_ENDPOINT"
    return f"{name}: {str(e).splitlines()[0][:200] if str(e) else 'no details'}; check the network and try again"

