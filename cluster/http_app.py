"""The FastAPI application: routes, API key, body limits and error shapes.

Owns no state beyond the app object (the `ApiService` holds the rest). Every error leaves as
the calling API's own body (see `cluster.errors`): schema errors are 400 (never FastAPI's 422),
unknown paths 404, a body over `max_body_bytes` 413, and unexpected exceptions 500 with an
error id in the body and the traceback only in the log.

Routes (the OpenAI ones also without the /v1 prefix, as DeepSeek serves them):
    POST /v1/chat/completions                     OpenAI Chat Completions
    POST /v1/messages, /anthropic/v1/messages     Anthropic Messages
    POST /v1/messages/count_tokens (+ /anthropic) Anthropic token counting
    GET  /v1/models, /v1/models/{id}              (Anthropic shape when `anthropic-version` is sent)
    GET  /health                                  200 only when every Engine replica is healthy
    GET  /metrics                                 Prometheus text
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import anthropic_api, openai_api
from cluster.api_service import ApiService
from cluster.errors import ANTHROPIC, OPENAI, APIError, api_of_path, error_response, invalid
from cluster.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)


async def read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes")
    if not body:
        raise invalid("the request body is empty; a JSON object is required")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from e


def _internal(api: str, exc: BaseException) -> Response:
    error_id = secrets.token_hex(6)
    log.error("internal error %s: %r", error_id, exc, exc_info=exc)
    return error_response(api, APIError(500, f"internal server error (error id {error_id})"))


def build_http_app(service: ApiService) -> FastAPI:
    app = FastAPI(title="dsv4-serve", docs_url=None, redoc_url=None, openapi_url=None)
    limit = service.config.max_body_bytes
    metrics = service.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(api_of_path(request.url.path), exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(api_of_path(request.url.path), invalid(f"invalid request: {exc.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = {404: f"no route for {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
        return error_response(api_of_path(request.url.path), APIError(status, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _internal(api_of_path(request.url.path), exc)

    async def run(request: Request, api: str, parse, start_args, complete, stream):
        model = ""
        try:
            service.check_api_key(request.headers)
            data = await read_json(request, limit)
            model = data.get("model", "") if isinstance(data, dict) and isinstance(data.get("model"), str) else ""
            req = parse(service, data)
            gen = await service.start(req.prompt_token_ids, service.sampling(**start_args(req)),
                                      is_thinking=req.is_thinking, cache_salt=req.cache_salt,
                                      affinity=getattr(req, "affinity", None))
        except APIError as e:
            metrics.on_request(api, model, e.status)
            return error_response(api, e)
        except Exception as e:
            metrics.on_request(api, model, 500)
            return _internal(api, e)
        metrics.on_request(api, model, 200)
        if req.is_stream:
            return stream(service, req, gen)
        try:
            return await complete(service, req, gen)
        except APIError as e:
            return error_response(api, e)
        except Exception as e:
            return _internal(api, e)
        finally:
            await gen.close()

    def openai_args(req):
        return dict(n=req.n, is_thinking=req.is_thinking, **req.sampling)

    def anthropic_args(req):
        return dict(n=1, is_thinking=req.is_thinking, **req.sampling)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, OPENAI, openai_api.parse_chat, openai_args, openai_api.complete, openai_api.stream)

    @app.post("/v1/messages")
    @app.post("/anthropic/v1/messages")
    async def messages(request: Request):
        return await run(request, ANTHROPIC, anthropic_api.parse_messages, anthropic_args,
                         anthropic_api.complete, anthropic_api.stream)

    @app.post("/v1/messages/count_tokens")
    @app.post("/anthropic/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        service.check_api_key(request.headers)
        data = await read_json(request, limit)
        req = anthropic_api.parse_messages(service, data, is_counting=True)
        return JSONResponse({"input_tokens": len(req.prompt_token_ids)})

    def model_json(model_id: str, is_anthropic: bool) -> dict:
        if is_anthropic:
            created = datetime.fromtimestamp(service.created, timezone.utc).isoformat().replace("+00:00", "Z")
            return {"type": "model", "id": model_id, "display_name": model_id, "created_at": created}
        return {"id": model_id, "object": "model", "created": service.created, "owned_by": "deepseek"}

    @app.get("/v1/models")
    @app.get("/models")
    @app.get("/anthropic/v1/models")
    async def models(request: Request):
        service.check_api_key(request.headers)
        is_anthropic = "anthropic-version" in request.headers or request.url.path.startswith("/anthropic/")
        data = [model_json(m, is_anthropic) for m in service.config.served_model_names]
        if is_anthropic:
            return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id}")
    @app.get("/models/{model_id}")
    async def model(request: Request, model_id: str):
        service.check_api_key(request.headers)
        try:
            service.check_model(model_id)
        except APIError as e:
            return error_response(OPENAI, e)
        return JSONResponse(model_json(model_id, "anthropic-version" in request.headers))

    @app.get("/health")
    async def health():
        oks = await asyncio.gather(*[service.pool.is_healthy(i) for i in range(service.pool.num_replicas)])
        body = {"status": "ok" if all(oks) else "unavailable",
                "replicas": [{"replica": i, "is_healthy": ok} for i, ok in enumerate(oks)]}
        return JSONResponse(body, status_code=200 if all(oks) else 503)

    @app.get("/metrics")
    async def prometheus():
        n = service.pool.num_replicas
        stats = await asyncio.gather(*[service.pool.stats(i) for i in range(n)], return_exceptions=True)
        for i, s in enumerate(stats):
            ok = not isinstance(s, BaseException) and s.is_healthy
            metrics.set_engine(i, None if isinstance(s, BaseException) else s, ok)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
