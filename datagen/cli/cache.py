"""`datagen cache stats | clear`: look into or empty the response cache."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.engine.cache import ResponseCache, remove_cache
from datagen.errors import VisinstructError
from datagen.escaping import echo, terminal_text
from datagen.sample import default_cache_path

cache_app = typer.Typer(help="Inspect or empty the response cache.", no_args_is_help=True)

CacheFileOpt = Annotated[Optional[Path], typer.Option(
    "--cache", help="Cache file (default $VISINSTRUCT_CACHE or data/.cache/responses.sqlite).")]


@cache_app.command("stats")
def cache_stats(cache: CacheFileOpt = None) -> None:
    """Entries, size and stored tokens of the response cache."""
    path = cache or default_cache_path()
    if not path.exists():
        raise VisinstructError(f"no cache at {path}", "run `datagen generate` first or pass --cache FILE")
    store = ResponseCache(path, read_only=True)
    stats = store.stats()
    store.close()
    echo(f"{stats.path}: {stats.entries} responses, {stats.size_bytes / 1e6:.1f} MB, "
         f"tokens {stats.prompt_tokens} in / {stats.completion_tokens} out")
    for name, count in sorted(stats.by_model.items()):
        echo(f"  {terminal_text(name)}: {count}")


@cache_app.command("clear")
def cache_clear(
    cache: CacheFileOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Only this model's responses.")] = None,
    all_files: Annotated[bool, typer.Option(
        "--all", help="Remove the cache file itself (and its -wal/-shm files), even when it is damaged.")] = False,
) -> None:
    """Delete cached responses (the next run pays for them again)."""
    path = cache or default_cache_path()
    if all_files:
        if model:
            raise VisinstructError("--all removes every model's responses", "drop --model, or drop --all")
        removed = remove_cache(path)
        if not removed:
            raise VisinstructError(f"no cache at {path}", "nothing to clear; pass --cache FILE if it lives elsewhere")
        echo(f"removed {', '.join(str(p) for p in removed)}")
        return
    if not path.exists():
        raise VisinstructError(f"no cache at {path}", "nothing to clear; pass --cache FILE if it lives elsewhere")
    store = ResponseCache(path)
    removed = store.clear(model)
    store.close()
    echo(f"removed {removed} responses from {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
