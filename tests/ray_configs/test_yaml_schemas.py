"""Every YAML in ray_configs/ parses and validates against Ray 2.60's own schemas."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "ray_configs")


def load(name: str) -> dict:
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    raw = load("cluster.yaml")
    jsonschema.validate(raw, schema)                 # as written
    validate_config(prepare_config(raw))             # as `ray up` fills it in
    bad = dict(raw, min_workers=1)                   # the schema really is strict (see ray-notes)
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("name", ["serve.yaml", "serve_local.yaml"])
def test_serve_yamls_validate_and_their_args_are_valid_options(name):
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ServeConfig

    parsed = ServeDeploySchema.model_validate(load(name))
    app = parsed.applications[0]
    assert app.import_path == "cluster.app:build_app"
    ServeConfig.from_args(dict(app.args) if name == "serve_local.yaml" else {**app.args, "model": None})
