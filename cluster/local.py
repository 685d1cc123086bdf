"""A Serve config deployed on a Ray cluster, as ``binserve serve`` and the benchmarks do it.

    with serving_locally_at("deploy/serve-local.yaml", ".models/smollm2-135m-instruct") as addresses:
        ...   # addresses.grpc, addresses.http: a local Ray cluster in this process, shut down afterwards

A Serve config is deployed the way ``serve run CONFIG`` does it (Serve's controller builds every application
from its ``import_path`` and ``args``, honouring per-deployment overrides), so the YAML means the same here,
under ``serve deploy`` and in a KubeRay ``RayService``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_NUM_CPUS = 8
"""Logical CPUs of a local cluster: deploy/serve-local.yaml reserves 5 (two 2-stage pools, the predictor,
the ingress); more than the cores is fine, the tiny model leaves its stages mostly idle."""


def load_serve_config(
    path: str | Path,
    model_dir: str | None = None,
    grpc_port: int | None = None,
    http_port: int | None = None,
    resolve_paths: bool = True,
):
    """Read and validate a Serve config (``ServeDeploySchema``), optionally overriding every application's
    ``args.model.model_dir`` and the proxies' ports. ``resolve_paths`` makes a relative ``model_dir`` absolute
    (for a cluster on this host: replicas do not share this process's working directory). Errors name
    the file and the field."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {str(path)!r} does not exist")
    raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    for app in raw.get("applications") or []:
        if model_dir is not None:
            app["args"] = app.get("args") or {}
            app["args"]["model"] = {**(app["args"].get("model") or {}), "model_dir": model_dir}
        model = (app.get("args") or {}).get("model")
        if resolve_paths and isinstance(model, dict) and isinstance(model.get("model_dir"), str):
            model["model_dir"] = str(Path(model["model_dir"]).resolve())
    if grpc_port is not None:
        raw["grpc_options"] = {**(raw.get("grpc_options") or {}), "port": grpc_port}
    if http_port is not None:
        raw["http_options"] = {**(raw.get("http_options") or {}), "port": http_port}
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"config: {path}: {exc}") from None


def check_paths(config) -> None:
    """Every application's model and predictor directories exist here, or a ``ValueError`` says which
    path is missing and how to create it (else Serve would only report a failed ``ingress``)."""
    from cluster.predictor import SHIPPED

    for app in config.applications:
        args = app.args or {}
        model_dir = (args.get("model") or {}).get("model_dir")
        if isinstance(model_dir, str) and not (Path(model_dir) / "config.json").is_file():
            what = "does not exist" if not Path(model_dir).exists() else "has no config.json"
            raise ValueError(
                f"applications[{app.name}].args.model.model_dir: {model_dir} {what}. Create it with "
                f"`binserve prepare-model smollm2-135m-instruct {model_dir}` (or `make model`), "
                f"`binserve convert-gguf FILE.gguf {model_dir}` for your own GGUF, or "
                f"`binserve make-tiny-model {model_dir}` for the tests' tiny random model"
            )
        predictor = (args.get("predictor") or {}).get("path")
        if isinstance(predictor, str) and predictor not in SHIPPED and not Path(predictor).is_dir():
            raise ValueError(
                f"applications[{app.name}].args.predictor.path: {predictor} does not exist. Train one with "
                f"`binserve predictor train-linear --labels FILE --tokenizer MODEL_DIR --out {predictor}`, name a "
                "shipped one (`default`, `fast`), or remove predictor.path to use the default"
            )
        probe = (args.get("model") or {}).get("length_probe")
        if isinstance(probe, str) and probe != "default" and not Path(probe).is_dir():
            raise ValueError(
                f"applications[{app.name}].args.model.length_probe: {probe} does not exist. Train one with "
                f"`binserve predictor train-probe --labels L --features F --model MODEL_DIR --out {probe}`, "
                "use `default` (the probe shipped for SmolLM2), or remove it to serve without one"
            )
        if isinstance(model_dir, str):  # warns (stderr) when the predictor learned another model's lengths
            from cluster.predictor import check_predictor_for_model

            check_predictor_for_model(predictor if isinstance(predictor, str) else None, model_dir)


def deploy(config, timeout_s: float = 600.0) -> None:
    """Start Serve (proxies with the config's HTTP and gRPC options, the controller with its
    ``controller_options``) on the connected Ray cluster, deploy the config's applications and wait until
    they are RUNNING."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
        # Its runtime_env env_vars reach the proxies it starts: e.g. RAY_SERVE_GRPC_MAX_MESSAGE_SIZE.
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)
    wait_until_running([app.name for app in config.applications], timeout_s)


def wait_until_running(app_names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline_s = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        pending = [name for name in app_names if name not in statuses or statuses[name].status != "RUNNING"]
        for name in pending:
            if name in statuses and statuses[name].status == "DEPLOY_FAILED":
                raise RuntimeError(f"application {name!r} failed to deploy: {statuses[name].message}")
        if not pending:
            return
        if time.monotonic() > deadline_s:
            raise TimeoutError(f"applications {pending} not RUNNING after {timeout_s:.0f}s")
        time.sleep(0.5)


def start_local_ray(num_cpus: int = DEFAULT_NUM_CPUS, metrics_export_port: int | None = None) -> None:
    """A local Ray cluster of ``num_cpus`` logical CPUs, without the dashboard; with
    ``metrics_export_port``, Ray's Prometheus endpoint (``binserve_*`` series included) listens there."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    ray.init(
        address="local",  # always a new cluster, never one that `ray start` left running on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace=SERVE_NAMESPACE,
        log_to_driver=False,
        _metrics_export_port=metrics_export_port,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServeAddresses:
    grpc: str
    """HOST:PORT of Serve's gRPC proxy."""
    http: str
    """Base URL of Serve's HTTP proxy (the OpenAI API is under ``/v1``)."""


@contextlib.contextmanager
def serving_locally_at(
    config_path: str | Path,
    model_dir: str,
    num_cpus: int = DEFAULT_NUM_CPUS,
    metrics_export_port: int | None = None,
) -> Iterator[ServeAddresses]:
    """Start a local Ray cluster in this process, deploy a Serve config on free ports and yield both
    proxies' addresses; shut it all down afterwards. This process is then the cluster's driver, so it can
    also reach the deployments through handles (``serve.get_deployment_handle``)."""
    import ray
    from ray import serve

    for attempt in range(PORT_ATTEMPTS):
        grpc_port, http_port = free_port(), free_port()
        config = load_serve_config(config_path, model_dir=model_dir, grpc_port=grpc_port, http_port=http_port)
        check_paths(config)
        start_local_ray(num_cpus, metrics_export_port)
        try:
            deploy(config)
            break
        except BaseException as exc:
            serve.shutdown()
            ray.shutdown()
            if not _port_taken(exc) or attempt == PORT_ATTEMPTS - 1:
                raise
    try:
        yield ServeAddresses(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
    finally:
        serve.shutdown()
        ray.shutdown()


PORT_ATTEMPTS = 3
"""Starts with fresh ports when a proxy's port was taken between ``free_port`` and its bind (another
process's outgoing connection can draw the same ephemeral port meanwhile)."""


def _port_taken(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "failed to bind" in text or "address already in use" in text


@contextlib.contextmanager
def serving_locally(
    config_path: str | Path,
    model_dir: str,
    num_cpus: int = DEFAULT_NUM_CPUS,
    metrics_export_port: int | None = None,
) -> Iterator[str]:
    """``serving_locally_at``, yielding the gRPC address only."""
    with serving_locally_at(config_path, model_dir, num_cpus, metrics_export_port) as addresses:
        yield addresses.grpc
