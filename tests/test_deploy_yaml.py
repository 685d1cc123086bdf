"""Deployment files and the application's configuration, checked against Ray's own schemas."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from cluster.app import AUTOSCALING_POLICY, INLINE_USER_CODE, SERVICER_FUNCTION, pool_options
from cluster.autoscaling import PredictedTokensPolicy
from cluster.config import AppConfig
from cluster.grpc_proxy import INSTALL_FUNCTION
from cluster.local import load_serve_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVE_CONFIGS = ["serve-local.yaml", "serve-gpu.yaml", "serve-conversations.yaml"]


def serve_config_of(name: str) -> dict:
    raw = yaml.safe_load((DEPLOY / name).read_text())
    if raw.get("kind") == "RayService":
        return yaml.safe_load(raw["spec"]["serveConfigV2"])
    return raw


@pytest.mark.parametrize("name", [*SERVE_CONFIGS, "rayservice.yaml"])
def test_serve_configs_validate_with_serves_schema_and_ours(name: str) -> None:
    raw = serve_config_of(name)
    config = ServeDeploySchema.model_validate(raw)
    assert SERVICER_FUNCTION in config.grpc_options.grpc_servicer_functions
    assert INSTALL_FUNCTION in config.grpc_options.grpc_servicer_functions
    for app_raw, app in zip(raw["applications"], config.applications, strict=True):
        ServeApplicationSchema.model_validate(app_raw)
        assert app.import_path == "cluster.app:build_app"
        AppConfig.from_args(app.args)  # the application's own checks on its args


def test_local_config_is_smollm2_on_cpu_in_two_bins_and_two_stages() -> None:
    config = AppConfig.from_args(serve_config_of("serve-local.yaml")["applications"][0]["args"])
    assert config.engine.model.model_dir == ".models/smollm2-135m-instruct"  # the default real model
    assert config.engine.model.device == "cpu"
    assert config.router.num_bins == 2 and config.engine.parallel.pp_size == 2
    assert config.engine.scheduler.queue_order == "ssjf"


def test_gpu_config_autoscales_four_bins_of_two_stage_replicas() -> None:
    config = AppConfig.from_args(serve_config_of("serve-gpu.yaml")["applications"][0]["args"])
    assert config.engine.model.device == "cuda" and config.engine.parallel.pp_size == 2
    assert config.engine.parallel.stage_placement == "pack"  # tests/multinode runs pack and spread
    # tests/multinode loses one under load, with the node it runs on
    assert (config.ingress.num_replicas, config.ingress.max_replicas_per_node) == (2, 1)
    assert config.router.num_bins == 4
    assert config.pools.is_autoscaling and config.pools.min_replicas < config.pools.max_replicas


def test_rayservice_carries_the_gpu_serve_config() -> None:
    raw = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert raw["apiVersion"] == "ray.io/v1" and raw["kind"] == "RayService"
    assert serve_config_of("rayservice.yaml") == serve_config_of("serve-gpu.yaml")
    ports = {
        p["containerPort"]
        for p in raw["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "ports"
        ]
    }
    assert 9000 in ports  # the gRPC proxy


def test_cluster_launcher_config_validates_with_rays_schema() -> None:
    raw = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(copy.deepcopy(raw)))  # with the provider's defaults filled in, as `ray up`
    assert raw["head_node_type"] in raw["available_node_types"]
    assert any(t.get("resources", {}).get("GPU") for t in raw["available_node_types"].values())
    assert any("serve-gpu.yaml" in command for command in raw["head_start_ray_commands"])


def test_binserve_serve_loads_a_config_with_overrides(tmp_path: Path) -> None:
    config = load_serve_config(DEPLOY / "serve-local.yaml", model_dir="tiny", grpc_port=50123)
    assert config.grpc_options.port == 50123
    assert config.applications[0].args["model"]["model_dir"] == str(Path("tiny").resolve())
    with pytest.raises(ValueError, match="does not exist"):
        load_serve_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("applications: [{name: x}]\n")
    with pytest.raises(ValueError, match=r"(?s)bad.yaml.*import_path"):
        load_serve_config(tmp_path / "bad.yaml")


ARGS = {"model": {"model_dir": "/m"}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, r"args.model: required"),
        ({"model": {}}, r"model.model_dir: required"),
        ({**ARGS, "routr": {}}, r"args.routr: unknown field; known fields: cache, ingress, metrics, model"),
        (
            {**ARGS, "router": {"num_bin": 2}},
            r"router.num_bin: unknown field; known fields: num_bins, num_pools",
        ),
        ({**ARGS, "router": {"num_bins": 0}}, r"router.num_bins: must be in \[1, 64\], got 0"),
        ({**ARGS, "router": {"num_bins": "2"}}, r"router.num_bins: must be int, got str '2'"),
        (
            {**ARGS, "router": {"num_bins": 2, "num_pools": 3}},
            r"router.num_pools: must be in \[1, 2\], got 3",
        ),
        ({**ARGS, "scheduler": {"chunk_size": 0}}, r"scheduler.chunk_size: must be in \[1, inf\], got 0"),
        ({**ARGS, "scheduler": {"queue_order": "lifo"}}, r"scheduler.queue_order: must be one of fcfs, ssjf"),
        ({**ARGS, "scheduler": {"chunk_size": True}}, r"scheduler.chunk_size: must be int, got bool"),
        ({**ARGS, "parallel": {"pp_size": 0}}, r"parallel.pp_size: must be in \[1, 64\], got 0"),
        ({**ARGS, "cache": {"kv_cache_bytes": 1.5}}, r"cache.kv_cache_bytes: must be int, got float"),
        (
            {**ARGS, "pools": {"min_replicas": 3, "max_replicas": 2}},
            r"pools.max_replicas: must be in \[3, inf\]",
        ),
        ({**ARGS, "predictor": {"max_batch_size": 0}}, r"predictor.max_batch_size: must be in \[1, 4096\]"),
        ({**ARGS, "ingress": {"max_output_tokens": 0}}, r"ingress.max_output_tokens: must be in \[1, inf\]"),
        (
            {**ARGS, "ingress": {"max_replicas_per_node": 0}},
            r"ingress.max_replicas_per_node: must be in \[1, 100\]",
        ),
        ({**ARGS, "model": {"model_dir": "/m", "dtype": "int3"}}, r"model.dtype: must be one of auto"),
        ({**ARGS, "pools": []}, r"pools: must be a mapping, got list"),
        (
            {**ARGS, "parallel": {"pp_size": 2}, "pools": {"num_cpus": 0}},
            r"pools.num_cpus: must be > 0 with parallel.pp_size 2",
        ),
        (
            {**ARGS, "parallel": {"separate_model_process": True}, "pools": {"num_cpus": 0}},
            r"pools.num_cpus: must be > 0 with parallel.separate_model_process",
        ),
        (
            {**ARGS, "parallel": {"separate_model_process": "yes"}},
            r"parallel.separate_model_process: must be bool, got str 'yes'",
        ),
    ],
)
def test_bad_args_name_the_field(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AppConfig.from_args(args)


def test_args_defaults_serve_ssjf_and_one_pool_per_bin() -> None:
    config = AppConfig.from_args(
        {"model": {"model_dir": "/m"}, "router": {"num_bins": 3}, "pools": {"num_cpus": 1}}
    )
    assert config.engine.scheduler.queue_order == "ssjf"
    assert config.router.resolved_num_pools == 3
    assert config.pools.num_cpus == 1.0 and isinstance(config.pools.num_cpus, float)
    assert (
        AppConfig.from_args({**ARGS, "scheduler": {"queue_order": "fcfs"}}).engine.scheduler.queue_order
        == "fcfs"
    )


def test_autoscaling_pools_use_the_predicted_tokens_policy() -> None:
    config = AppConfig.from_args(serve_config_of("serve-gpu.yaml")["applications"][0]["args"])
    options = pool_options(config.engine, config.pools)
    autoscaling = AutoscalingConfig(**options["autoscaling_config"])  # Serve's own validation
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.policy.policy_function == AUTOSCALING_POLICY
    assert autoscaling.policy.policy_kwargs == {"target_outstanding_tokens": 65536}
    assert "num_replicas" not in options
    # With pipeline stages the replica reserves its own bundle and one GPU bundle per stage.
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "runtime_env": INLINE_USER_CODE}
    # The engine queue is the SSJF queue: Serve hands the replica one call more than it queues.
    assert options["max_ongoing_requests"] == config.pools.max_queued_requests + 1


def test_fixed_pools_of_one_stage_take_the_model_resources_themselves() -> None:
    config = AppConfig.from_args(
        {**ARGS, "pools": {"num_cpus": 2, "num_gpus": 1, "min_replicas": 2, "max_replicas": 2}}
    )
    options = pool_options(config.engine, config.pools)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0, "runtime_env": INLINE_USER_CODE}
    assert "placement_group_bundles" not in options


def test_policy_refuses_a_bad_target() -> None:
    with pytest.raises(ValueError, match=r"target_outstanding_tokens: must be an integer >= 1, got 0"):
        PredictedTokensPolicy(target_outstanding_tokens=0)


def test_the_ingress_sheds_load_in_the_proxy_beyond_its_admission_bound() -> None:
    """serve-local: 2 pools x 1 replica x 128 queued = 256 admitted; the ingress takes 64 calls more, to
    refuse them at once itself (429 on HTTP; Serve's own proxy backpressure would answer 503)."""
    config = AppConfig.from_args(serve_config_of("serve-local.yaml")["applications"][0]["args"])
    assert config.max_admitted_requests == 256
    assert config.ingress_max_ongoing_requests == 256 + 64
    explicit = AppConfig.from_args(
        {**ARGS, "ingress": {"max_ongoing_requests": 10, "max_queued_requests": 5}}
    )
    assert (explicit.ingress_max_ongoing_requests, explicit.ingress.max_queued_requests) == (10, 5)
    with pytest.raises(ValueError, match=r"max_queued_requests: must be in \[1, inf\], got 0"):
        AppConfig.from_args({**ARGS, "ingress": {"max_queued_requests": 0}})


def test_length_probe_default_is_the_shipped_probe_for_its_model_only(tmp_path) -> None:
    """``default`` resolves to the shipped probe when the served model is the one it read (same
    config.json fingerprint); for another model it is dropped with a warning, not an error."""
    import json

    import cluster.predictor as predictor_package
    from cluster.predictor.served_model import ServedModel

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 8, "model_type": "llama"}))
    (model_dir / "tokenizer.json").write_text("{}")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    meta = {
        "hidden_size": 8,
        "model": "model",
        "model_config_sha256": ServedModel.of(model_dir).config_sha256,
    }
    (probe_dir / "probe.json").write_text(json.dumps(meta))
    saved = predictor_package.DEFAULT_PROBE_DIR
    predictor_package.DEFAULT_PROBE_DIR = probe_dir
    try:
        config = AppConfig.from_args({"model": {"model_dir": str(model_dir), "length_probe": "default"}})
        assert config.engine.model.length_probe == str(probe_dir)
        (model_dir / "config.json").write_text(json.dumps({"hidden_size": 16, "model_type": "llama"}))
        with pytest.warns(UserWarning, match="length probe: the shipped probe reads model's hidden states"):
            config = AppConfig.from_args({"model": {"model_dir": str(model_dir), "length_probe": "default"}})
        assert config.engine.model.length_probe is None
    finally:
        predictor_package.DEFAULT_PROBE_DIR = saved
    assert AppConfig.from_args(ARGS).engine.model.length_probe is None
