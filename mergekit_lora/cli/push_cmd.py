"""``loramerge push OUT org/name``: upload a merged adapter folder (with its card) to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_lora.hub import push_folder

from .common import console, user_errors


@user_errors
def push(
    folder: Annotated[Path, typer.Argument(help="a folder written by `loramerge merge` or `run`")],
    repo_id: Annotated[str, typer.Argument(help="the Hub repo: org/name (created if needed)")],
    private: Annotated[bool, typer.Option(help="create the repo as private")] = False,
    revision: Annotated[str | None, typer.Option(help="branch to push to (created if needed)")] = None,
    commit_message: Annotated[str | None, typer.Option(help="commit message")] = None,
) -> None:
    """Push a merged adapter to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""
    url = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    console.print(f"[green]pushed[/] {folder} to {repo_id}: {url}")
