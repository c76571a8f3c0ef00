"""`--push-to-hub`: one commit of an exported folder to a Hub dataset repo, with the user's own token."""
from __future__ import annotations

from pathlib import Path

from datagen.errors import VisinstructError
from datagen.hf_dataset import DATA_FOLDER, INSTALL_HINT

REPO_ID_HINT = "write the repo id as org/name (or user/name)"


def check_push(repo_id: str) -> str:
    """The token to push with, after checking the repo id: run before a long export, not after it."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise VisinstructError("huggingface_hub is not installed (needed for --push-to-hub)", INSTALL_HINT) from None
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise VisinstructError(f"--push-to-hub {repo_id!r} is not a repo id", REPO_ID_HINT)
    token = get_token()
    if not token:
        raise VisinstructError("no Hugging Face token found", "set HF_TOKEN or run `hf auth login` (the token is never stored by datagen)")
    return token


def push_folder(folder: Path, repo_id: str, private: bool = False, endpoint: str | None = None,
                token: str | None = None) -> str:
    """Create the dataset repo if needed and commit README.md and data/ (old shards removed); the commit URL.

    The token is the caller's or, when None, huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`'s
    file); it is passed in request headers only and never written anywhere.
    """
    token = token or check_push(repo_id)
    from huggingface_hub import HfApi  # optional dependency, present: check_push imported it
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        # private=None leaves the visibility to the namespace default (public unless the org says otherwise).
        api.create_repo(repo_id, repo_type="dataset", private=True if private else None, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
            allow_patterns=["README.md", f"{DATA_FOLDER}/**"], delete_patterns=[f"{DATA_FOLDER}/**"],
            commit_message="Upload dataset exported by visinstruct (datagen export --format hf)",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise VisinstructError(
            f"the Hub refused the push to {repo_id} (HTTP {status}: {str(exc).splitlines()[0]})",
            "check that the token has write access to that namespace and the repo id is right",
        ) from None
    except Exception as exc:  # the HTTP client's connection errors (refused, DNS, TLS) share no base class with OSError
        raise VisinstructError(f"cannot reach the Hub to push {repo_id} ({exc})", "check the network or HF_ENDPOINT") from exc
    return str(getattr(info, "commit_url", info))
