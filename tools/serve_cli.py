"""``binserve serve`` (run the application from a Serve config) and ``binserve client`` (call it).

    binserve serve --config deploy/serve-local.yaml                 # a local Ray cluster; Ctrl-C stops it
    binserve serve --config deploy/serve-gpu.yaml --address auto --detach   # deploy to a running cluster
    binserve client generate --address 127.0.0.1:9000 --prompt "Hello" --max-tokens 16 --stream
    binserve client generate --address 127.0.0.1:9000 --chat --prompt "What is Ray?"   # a user message
    binserve client info --address 127.0.0.1:9000
    curl http://127.0.0.1:8000/v1/models                                 # the OpenAI-compatible HTTP API

A Serve config is deployed the way ``serve run CONFIG`` does it (Serve's controller builds every
application from its ``import_path`` and ``args``, honouring per-deployment overrides), so the YAML
means the same here, under ``serve deploy`` and in a KubeRay ``RayService``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

API_KEY_ENV = "BINSERVE_API_KEY"  # cluster.auth reads the same variable on the server
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
        if isinstance(predictor, str) and not Path(predictor).is_dir():
            raise ValueError(
                f"applications[{app.name}].args.predictor.path: {predictor} does not exist. Train one with "
                f"`binserve train-predictor --data FILE --tokenizer MODEL_DIR --out {predictor}`, or remove "
                "predictor.path to use the default predictor shipped in the repository"
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

    grpc_port, http_port = free_port(), free_port()
    config = load_serve_config(config_path, model_dir=model_dir, grpc_port=grpc_port, http_port=http_port)
    check_paths(config)
    start_local_ray(num_cpus, metrics_export_port)
    try:
        deploy(config)
        yield ServeAddresses(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
    finally:
        serve.shutdown()
        ray.shutdown()


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


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    config = load_serve_config(
        args.config,
        model_dir=args.model_dir,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        resolve_paths=args.address is None,
    )
    if args.address is None:
        check_paths(config)  # on another cluster the paths are the nodes', not this host's
        start_local_ray(args.num_cpus, args.metrics_export_port)
    else:
        ray.init(address=args.address, namespace=SERVE_NAMESPACE)
    # A supervisor's SIGTERM stops it as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        deploy(config, timeout_s=args.timeout)
        ray_address = ray.get_runtime_context().gcs_address
        http = config.http_options
        print(
            f"binserve is serving gRPC on port {config.grpc_options.port} and the OpenAI-compatible HTTP "
            f"API at http://{http.host}:{http.port}/v1, Ray at {ray_address}"
            + ("" if args.detach else " (Ctrl-C stops it)"),
            flush=True,
        )
        if args.detach:
            return 0
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
    finally:
        if not args.detach:
            serve.shutdown()
        ray.shutdown()
    return 0


def _response_json(response) -> dict[str, Any]:
    from cluster.client import FINISH_REASON_NAMES

    return {
        "request_id": response.request_id,
        "text": response.text,
        "token_ids": list(response.token_ids),
        "finish_reason": FINISH_REASON_NAMES[response.finish_reason],
        "num_prompt_tokens": response.usage.num_prompt_tokens,
        "num_output_tokens": response.usage.num_output_tokens,
        "predicted_output_tokens": response.predicted_output_tokens,
        "bin": response.bin,
        "ttft_s": response.ttft_s,
        "total_s": response.total_s,
    }


async def _client_generate(args: argparse.Namespace) -> int:
    from cluster.client import GenerationClient, make_request

    request = make_request(
        "" if args.chat else args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
        messages=[("user", args.prompt)] if args.chat else (),
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )
    async with GenerationClient(args.address, args.application, args.api_key) as client:
        if args.stream and not args.json:
            async for message in client.generate_stream(request, timeout_s=args.timeout):
                print(message.text, end="", flush=True)
            print()
            print(
                f"[bin {message.bin}, predicted {message.predicted_output_tokens} tokens, "
                f"{message.usage.num_output_tokens} generated, TTFT {message.ttft_s * 1e3:.1f} ms]",
                file=sys.stderr,
            )
            return 0
        timed = await client.generate_timed(request, stream=args.stream, timeout_s=args.timeout)
    result = _response_json(timed.response)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        print(
            f"[bin {result['bin']}, predicted {result['predicted_output_tokens']} tokens, "
            f"{result['num_output_tokens']} generated, finish_reason={result['finish_reason']}]",
            file=sys.stderr,
        )
    return 0


async def _client_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from cluster.client import GenerationClient

    async with GenerationClient(args.address, args.application, args.api_key) as client:
        info = await client.model_info(timeout_s=args.timeout)
    print(
        json.dumps(
            MessageToDict(info, always_print_fields_with_no_presence=True, preserving_proto_field_name=True),
            indent=2,
        )
    )
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    import grpc

    try:
        return asyncio.run(_client_generate(args) if args.client == "generate" else _client_info(args))
    except grpc.aio.AioRpcError as exc:
        print(f"binserve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the serving application from a Serve config (YAML)")
    p.add_argument("--config", required=True, help="a Serve config, e.g. deploy/serve-local.yaml")
    p.add_argument("--address", default=None, help="a running Ray cluster (e.g. auto); default: start one")
    p.add_argument("--model-dir", default=None, help="override every application's args.model.model_dir")
    p.add_argument("--grpc-port", type=int, default=None, help="override grpc_options.port")
    p.add_argument("--http-port", type=int, default=None, help="override http_options.port")
    p.add_argument("--num-cpus", type=int, default=DEFAULT_NUM_CPUS, help="CPUs of the local cluster")
    p.add_argument(
        "--metrics-export-port",
        type=int,
        default=None,
        help="the local cluster's Prometheus endpoint (binserve_* metrics); on a running cluster, the "
        "port given to `ray start --metrics-export-port`",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the applications")
    p.add_argument("--detach", action="store_true", help="deploy and exit, leaving the applications running")
    p.set_defaults(func=cmd_serve)

    client = subparsers.add_parser("client", help="call a running binserve over gRPC")
    client_sub = client.add_subparsers(dest="client", required=True, metavar="CALL")
    for name, help_text in (("generate", "generate for one prompt"), ("info", "the model and the bins")):
        p = client_sub.add_parser(name, help=help_text)
        p.add_argument("--address", required=True, help="HOST:PORT of Serve's gRPC proxy")
        p.add_argument("--application", default=None, help="Serve application name (several on one cluster)")
        p.add_argument("--timeout", type=float, default=None, help="call deadline, seconds")
        p.add_argument(
            "--api-key",
            default=os.environ.get(API_KEY_ENV),
            help=f"sent as `authorization: Bearer KEY` (default: ${API_KEY_ENV})",
        )
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--chat", action="store_true", help="send the prompt as a user message")
            # Unset sampling fields take the deployment's serving defaults (`client info` shows them).
            p.add_argument("--max-tokens", type=int, default=None)
            p.add_argument("--temperature", type=float, default=None, help="0: greedy")
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--repetition-penalty", type=float, default=None)
            p.add_argument("--presence-penalty", type=float, default=None)
            p.add_argument("--frequency-penalty", type=float, default=None)
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--stop", action="append", help="a stop string (repeatable)")
            p.add_argument("--ignore-eos", action="store_true")
            p.add_argument("--stream", action="store_true", help="stream the tokens as they come")
            p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=cmd_client)
