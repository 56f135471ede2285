"""Models from the Hugging Face Hub: the local cache read without network (:mod:`.cache`), and
downloads with progress, clear failures and resumption (:mod:`.fetch`)."""

from .cache import (CachedModel, cached_models, cached_snapshot, directory_size, hub_cache_dir, is_hub_model,
                    is_repo_id, local_snapshot)
from .download import DownloadInterrupted, HubError, fetch, format_bytes, hub_endpoint

__all__ = ["CachedModel", "DownloadInterrupted", "HubError", "cached_models", "cached_snapshot", "directory_size", "fetch",
           "format_bytes", "hub_cache_dir", "hub_endpoint", "is_hub_model", "is_repo_id", "local_snapshot"]
