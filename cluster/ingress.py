"""Ingress: the HTTP front of the application as a Serve deployment (FastAPI, CPU only).

Owns: one `ApiService` per ingress replica (tokenizer, replica router, metrics) around handles
to every Engine replica. The FastAPI app is built after the constructor, through Serve's
late-bound `__serve_build_asgi_app__`, so its routes close over this replica's service.
"""

from __future__ import annotations

from ray import serve

from cluster.api_service import ApiService
from cluster.config import ServeConfig
from cluster.engine_client import ServeEnginePool
from cluster.http_app import build_http_app
from model_shards import ModelConfig
from model_shards.tokenizer import load_tokenizer


def max_model_len(config: ServeConfig, checkpoint_dir: str) -> int:
    model_len = int(ModelConfig.from_json(checkpoint_dir).max_position_embeddings or 0)
    return config.max_model_len or model_len or (1 << 20)


@serve.ingress()
class Ingress:
    def __init__(self, config: ServeConfig, engines: list):
        path = config.resolve_model_path()
        self.service = ApiService(config, load_tokenizer(path), ServeEnginePool(engines), max_model_len(config, path))

    def __serve_build_asgi_app__(self):
        return build_http_app(self.service)
