"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from datagen.backends.base import TRANSPORTS, ChatRequest, Completion, SamplingParams
from datagen.engine.cache import MessagesJson
from datagen.engine.errors import EndpointUnreachableError, MalformedResponseError, RateLimitedError, TransientError
from datagen.engine.ratelimit import parse_retry_after
from datagen.errors import VisinstructError
from datagen.urls import check_base_url, endpoint_parts

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

# How chat completions travel; measured in bench/datagen_bench.py (README table): "direct" (aiohttp, no SDK on
# the hot path) costs about half the CPU per request of the SDK over aiohttp, and a third of the SDK over httpx.
DEFAULT_CONCURRENCY = 64
DEFAULT_API_BASE = "https://api.openai.com/v1"  # the SDK's default endpoint
# The body goes pre-encoded (the SDK would deep-copy and re-encode it), so the content type is set here.
_JSON_OPTIONS = {"headers": {"Content-Type": "application/json"}}


def fatal_status_error(status: int, message: str, base_url: str | None, model: str) -> VisinstructError | None:
    """The user-facing error for a status the user must fix (400/401/403/404); None for the others."""
    where = base_url or "api.openai.com"
    if status == 401:
        return VisinstructError(f"{where} rejected the API key (401)", "set OPENAI_API_KEY to a valid key")
    if status == 403:
        return VisinstructError(f"{where} refused the request (403)", "check the key's access to the model")
    if status == 404:
        return VisinstructError(
            f"{where} does not know model {model!r} (404)", "check --model against the server's /models list and --base-url"
        )
    if status == 400:
        return VisinstructError(f"{where} rejected the request (400): {message}", "check --model and --max-tokens")
    return None


def status_error(status: int, message: str, headers: Mapping[str, str], base_url: str | None, model: str) -> Exception:
    """What a non-2xx answer means to the engine: stop the run (VisinstructError) or retry (TransientError)."""
    fatal = fatal_status_error(status, message, base_url, model)
    if fatal is not None:
        return fatal
    if status == 429:
        return RateLimitedError("429 rate limited", parse_retry_after(headers.get("retry-after")))
    if status >= 500 or status in (408, 409, 425):
        return TransientError(f"HTTP {status}", parse_retry_after(headers.get("retry-after")))
    return VisinstructError(f"{base_url or 'api.openai.com'} answered HTTP {status}: {message}", "check the request settings")


def _sdk():
    """The openai SDK, imported on first use to keep start-up fast: its import costs about half a second of CPU,
    which a run over the direct transport never needs (only the SDK transports and the Batch API use it)."""
    import openai

    return openai


def translate_api_error(exc: Exception, base_url: str | None, model: str) -> VisinstructError | None:
    """Map an openai exception the user must fix to a VisinstructError; None if it is transient."""
    openai = _sdk()
    if isinstance(exc, openai.APIStatusError):
        return fatal_status_error(exc.status_code, exc.message, base_url, model)
    return None


def classify_error(exc: Exception, base_url: str | None, model: str) -> Exception:
    """The exception the engine should see: VisinstructError (stop), a TransientError (retry), or `exc` itself."""
    openai = _sdk()
    if isinstance(exc, openai.APIStatusError):
        return status_error(exc.status_code, exc.message, exc.response.headers, base_url, model)
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        cause = exc.__cause__
        # The aiohttp shim reports a refused connection as ConnectTimeout, httpx as ConnectError.
        if cause is not None and type(cause).__name__ in ("ConnectError", "ConnectTimeout"):
            return EndpointUnreachableError(f"cannot connect: {cause}")
        if isinstance(exc, openai.APITimeoutError):
            return TransientError("timeout")
        return TransientError(f"connection error: {type(cause).__name__ if cause else exc}")
    return exc


def completion_from_body(body: Any, fallback_model: str) -> Completion:
    """A Completion from a decoded chat.completion object; MalformedResponseError if it is not one."""
    try:
        choices = sorted(body["choices"], key=lambda c: int(c.get("index") or 0))
        usage = body.get("usage") or {}
        model = body.get("model") or fallback_model
        # Usage is the request's total: the prompt once and every choice's tokens, all counted on the first choice.
        others = tuple(_choice(choice, model) for choice in choices[1:])
        return _choice(choices[0], model, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                       others)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise MalformedResponseError("response is not a chat completion") from None


def _choice(choice: Any, model: str, prompt_tokens: int = 0, completion_tokens: int = 0,
            alternatives: tuple[Completion, ...] = ()) -> Completion:
    """One choice of a chat.completion body (the caller maps the errors of a malformed one)."""
    return Completion(text=choice["message"].get("content") or "", finish_reason=choice.get("finish_reason") or "stop",
                      prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model=model,
                      alternatives=alternatives)


def _error_message(content: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content[:200].decode("utf-8", "replace")


def make_http_client(transport: str, concurrency: int, timeout: float):
    """The SDK's HTTP client for a transport, with a connection pool as large as the concurrency."""
    import httpx2  # with the SDK, on first use (start-up)

    openai = _sdk()

    limits = httpx2.Limits(max_connections=max(concurrency, 1), max_keepalive_connections=max(concurrency, 1))
    timeouts = httpx2.Timeout(timeout, connect=min(timeout, 10.0))
    if transport in ("aiohttp", "direct"):
        return openai.DefaultAioHttpClient(limits=limits, timeout=timeouts)
    if transport == "httpx":
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeouts)
    raise VisinstructError(f"unknown transport {transport!r}", f"use one of {', '.join(TRANSPORTS)}")


def chat_body(model: str, request: ChatRequest) -> dict:
    """The JSON body of one chat completion request: the same for live requests and Batch API lines."""
    p = request.params
    payload = {"model": model, "messages": request.messages, "temperature": p.temperature,
               "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed}
    if p.repetition_penalty != 1.0:  # a vLLM / llama.cpp extension; sent only when asked for
        payload["repetition_penalty"] = p.repetition_penalty
    if p.n != 1:  # best-of-N: N choices for one prompt (billed once)
        payload["n"] = p.n
    return payload


class OpenAIBackend:
    """One request per call; the engine decides concurrency, pacing and retries (the SDK's own are off)."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = DEFAULT_CONCURRENCY,
        transport: str = "direct",
    ) -> None:
        base_url = check_base_url(base_url, "the endpoint URL (--base-url or OPENAI_BASE_URL)")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                raise VisinstructError("OPENAI_API_KEY is not set", "export OPENAI_API_KEY or pass --base-url for a local server")
            key = "EMPTY"  # local servers (vLLM, Ollama, llama.cpp) accept any key
        self.model = model
        self.base_url = base_url  # as given (messages redact it); the clients get it split below
        self.preferred_concurrency = concurrency
        self.observe_headers: Callable[[Mapping[str, str]], None] | None = None
        self.transport = transport
        self.timeout = timeout
        self._session = None  # the direct transport's aiohttp session, made inside the running loop
        # Credentials inside the URL (user:password, ?key=...) travel as a header and query parameters.
        url, self._query, basic = endpoint_parts(base_url) if base_url else (None, {}, None)
        self._auth_override = {"Authorization": basic} if basic else {}
        # chat_body's key order: model, messages, then the sampling fields.
        self._body_start = '{"model": ' + json.dumps(model) + ', "messages": '
        self._messages_json = MessagesJson()
        self._body_tails: dict[SamplingParams, str] = {}
        if transport not in TRANSPORTS:
            raise VisinstructError(f"unknown transport {transport!r}", f"use one of {', '.join(TRANSPORTS)}")
        self._key = key
        self._url = url
        self._client: openai.AsyncOpenAI | None = None  # made on first use: the direct transport never needs it

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client (the SDK transports and the Batch API commands), made on first use."""
        if self._client is None:
            self._client = _sdk().AsyncOpenAI(
                api_key=self._key,
                base_url=self._url,
                timeout=self.timeout,
                max_retries=0,
                default_headers=self._auth_override or None,
                default_query=self._query or None,
                http_client=make_http_client(self.transport, self.preferred_concurrency, self.timeout),
            )
        return self._client

    def encode_body(self, request: ChatRequest) -> bytes:
        """`json.dumps(chat_body(model, request))`, with the prompt head and the sampling fields encoded once."""
        tail = self._body_tails.get(request.params)
        if tail is None:
            rest = {k: v for k, v in chat_body(self.model, request).items() if k not in ("model", "messages")}
            tail = self._body_tails[request.params] = (", " + json.dumps(rest)[1:]) if rest else "}"
        return (self._body_start + self._messages_json.encode(request.messages) + tail).encode()

    async def complete(self, request: ChatRequest) -> Completion:
        body = self.encode_body(request)
        if self.transport == "direct":
            status, headers, content = await self._post_direct(body)
        else:
            status, headers, content = await self._post_sdk(body)
        if self.observe_headers is not None:
            self.observe_headers(headers)
        try:
            decoded = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MalformedResponseError(f"truncated or invalid JSON body ({len(content)} bytes)") from None
        return completion_from_body(decoded, self.model)

    async def _post_sdk(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        """Through the SDK client (auth, headers, timeouts and its error mapping); no typed-params transform."""
        import httpx2  # with the SDK, on first use (start-up)

        openai = _sdk()
        try:
            response = await self.client.post("/chat/completions", cast_to=httpx2.Response, content=body,
                                              options=_JSON_OPTIONS)
            return response.status_code, response.headers, response.content
        except openai.APIError as exc:
            raise classify_error(exc, self.base_url, self.model) from None
        except httpx2.HTTPError as exc:  # the body broke off after the status line
            raise TransientError(f"connection error while reading the body: {type(exc).__name__}") from None

    async def _post_direct(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        """Straight over aiohttp with the URL and auth headers the SDK client would use; statuses classified as the
        SDK path does (the SDK itself is never imported on this path)."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(self.preferred_concurrency, 1)),
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=min(self.timeout, 10.0)),
                headers={"Authorization": f"Bearer {self._key}", **self._auth_override,
                         "Content-Type": "application/json", "Accept": "application/json"},
            )
            # As the SDK resolves it: the URL given, else $OPENAI_BASE_URL, else OpenAI's.
            base = self._url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_BASE
            self._chat_url = base.rstrip("/") + "/chat/completions"
        try:
            async with self._session.post(self._chat_url, data=body, params=self._query or None) as response:
                content = await response.read()
                status, headers = response.status, response.headers
        except asyncio.TimeoutError:
            raise TransientError("timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise EndpointUnreachableError(f"cannot connect: {exc}") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"connection error: {type(exc).__name__}") from None
        if status >= 300:
            raise status_error(status, _error_message(content), headers, self.base_url, self.model)
        return status, headers, content

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.close()
