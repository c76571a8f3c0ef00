"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server)."""
from __future__ import annotations

import os

import openai

from datagen.backends.base import ChatRequest, Completion
from datagen.errors import VisinstructError


def translate_api_error(exc: Exception, base_url: str | None, model: str) -> VisinstructError | None:
    """Map an openai exception the user must fix to a VisinstructError; None if it is transient."""
    where = base_url or "api.openai.com"
    if isinstance(exc, openai.AuthenticationError):
        return VisinstructError(f"{where} rejected the API key (401)", "set OPENAI_API_KEY to a valid key")
    if isinstance(exc, openai.PermissionDeniedError):
        return VisinstructError(f"{where} refused the request (403)", "check the key's access to the model")
    if isinstance(exc, openai.NotFoundError):
        return VisinstructError(
            f"{where} does not know model {model!r} (404)", "check --model against the server's /models list and --base-url"
        )
    if isinstance(exc, openai.BadRequestError):
        return VisinstructError(f"{where} rejected the request (400): {exc.message}", "check --model and --max-tokens")
    if isinstance(exc, openai.APIConnectionError):
        return VisinstructError(f"cannot reach the endpoint at {where}", "start the server or fix --base-url")
    return None


class OpenAIBackend:
    """Plain async client: one request per call, the caller decides concurrency."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        concurrency: int = 16,
    ) -> None:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                raise VisinstructError("OPENAI_API_KEY is not set", "export OPENAI_API_KEY or pass --base-url for a local server")
            key = "EMPTY"  # local servers (vLLM, Ollama, llama.cpp) accept any key
        self.model = model
        self.base_url = base_url
        self.preferred_concurrency = concurrency
        self._client = openai.AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    async def complete(self, request: ChatRequest) -> Completion:
        p = request.params
        try:
            resp = await self._client.chat.completions.create(
                model=self.model,
                messages=request.messages,
                temperature=p.temperature,
                top_p=p.top_p,
                max_tokens=p.max_tokens,
                seed=p.seed,
            )
        except openai.APIError as exc:
            err = translate_api_error(exc, self.base_url, self.model)
            if err is not None:
                raise err from None
            raise
        choice = resp.choices[0]
        usage = resp.usage
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            model=resp.model or self.model,
        )

    async def aclose(self) -> None:
        await self._client.close()
