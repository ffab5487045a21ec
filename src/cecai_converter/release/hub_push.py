"""The Hugging Face push: the same GGUF files, release manifests and ``SHA256SUMS`` as a GitHub release, committed
to a model repo in one commit (unsplit: the Hub takes large files), with the model card as its ``README.md``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PublishFailed
from ..fsutil import atomic_write_text
from ..records import read_records
from .assets import CHECKSUMS_NAME, checksums_text, collect_assets
from .manifests import attach_checks

__all__ = ["push_to_hub"]


def push_to_hub(
    inputs: Sequence[Path],
    repo_id: str,
    *,
    token: str | None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
    card: str | None = None,
    checks: Sequence[Path] = (),
) -> str:
    """Upload the GGUF files (unsplit: the Hub takes large files), release manifests (as on GitHub: no host paths,
    ``checks`` merged in; see :func:`release_manifest`) and SHA256SUMS to a model repo, and ``card`` (see
    ``card.render_card``), when given, as the repo's ``README.md``.

    Returns the commit URL.

    Raises:
        UsageError: bad inputs (see :func:`collect_assets`) or check records, before anything is uploaded.
        PublishFailed: the Hub refused the upload.
    """
    # Imported here: huggingface_hub is a large import that only a Hub push needs.
    from huggingface_hub import CommitOperationAdd, HfApi

    assets = collect_assets(inputs)
    records = read_records(list(checks)) if checks else []
    hub = api if api is not None else HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cecai-hub-") as tmp:
        files, _ = attach_checks(assets, records, Path(tmp))
        sums = Path(tmp) / CHECKSUMS_NAME
        atomic_write_text(sums, checksums_text({a.name: a.sha256 for a in files}))
        ops = [CommitOperationAdd(path_in_repo=a.name, path_or_fileobj=str(a.path)) for a in files]
        ops.append(CommitOperationAdd(path_in_repo=CHECKSUMS_NAME, path_or_fileobj=str(sums)))
        if card is not None:
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        try:
            hub.create_repo(repo_id, repo_type="model", exist_ok=True)
            info = hub.create_commit(
                repo_id,
                operations=ops,
                commit_message=commit_message or f"Add {len(files)} file(s) from cecai-converter",
                revision=revision,
            )
        except Exception as exc:  # huggingface_hub raises many types (HTTP, auth, validation)
            raise PublishFailed(
                f"pushing to the Hugging Face repo {repo_id} failed: {type(exc).__name__}: {exc}",
                hint="check HF_TOKEN (it needs write access to the repo) and the repo id",
            ) from None
    return str(getattr(info, "commit_url", info))
