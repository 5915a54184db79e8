"""Serve application builder: `cluster.app:build_app` for `serve run` / `serve deploy`.

Owns: the application's shape. `num_replicas` Engine deployments named `Engine0`, `Engine1`, ...
(one replica each, so the ingress can route a conversation to the replica that holds its prefix;
Serve still restarts each on failure) and one `Ingress` deployment (FastAPI) holding handles to
all of them. Serve config example:

    applications:
      - name: dsv4
        route_prefix: /
        import_path: cluster.app:build_app
        args: {num_replicas: 2, kv_redis_url: "redis://127.0.0.1:6379/0", kv_dir: /var/cache/dsv4kv}
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from cluster.config import ServeConfig
from cluster.engine_deployment import EngineDeployment
from cluster.ingress import Ingress


def engine_deployment_name(index: int) -> str:
    return f"Engine{index}"


def build_app(args: dict | None = None) -> Application:
    """`args`: ServeConfig options (see cluster/config.py); unknown or ill-typed ones raise
    ConfigError before anything starts."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args)
    # Serve's default of 5 ongoing requests per replica would queue requests in front of the
    # engine's own scheduler; let the engine's queue (and its 429) be the only limit.
    engine_slots = 2 * (config.max_num_seqs + config.max_num_waiting) + 32
    engines = []
    for i in range(config.num_replicas):
        dep = serve.deployment(
            EngineDeployment, name=engine_deployment_name(i), num_replicas=1, max_ongoing_requests=engine_slots,
            ray_actor_options={"num_cpus": config.engine_num_cpus, "num_gpus": config.engine_num_gpus},
            health_check_period_s=5, health_check_timeout_s=60, graceful_shutdown_timeout_s=5)
        engines.append(dep.bind(config, i))
    ingress = serve.deployment(
        Ingress, name="Ingress", num_replicas=config.num_ingress_replicas,
        max_ongoing_requests=engine_slots * config.num_replicas + 64,
        ray_actor_options={"num_cpus": config.ingress_num_cpus})
    return ingress.bind(config, engines)
