"""``binserve serve`` (run the application from a Serve config) and ``binserve client`` (call it).

    binserve serve --config deploy/serve-local.yaml                 # a local Ray cluster; Ctrl-C stops it
    binserve serve --config deploy/serve-gpu.yaml --address auto --detach   # deploy to a running cluster
    binserve client generate --address 127.0.0.1:9000 --prompt "Hello" --max-tokens 16 --stream
    binserve client generate --address 127.0.0.1:9000 --chat --prompt "What is Ray?"   # a user message
    binserve client info --address 127.0.0.1:9000
    curl http://127.0.0.1:8000/v1/models                                 # the OpenAI-compatible HTTP API

The config is deployed by ``cluster/local.py``, the way ``serve run CONFIG`` does it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from cluster.local import DEFAULT_NUM_CPUS, check_paths, deploy, load_serve_config, start_local_ray

API_KEY_ENV = "BINSERVE_API_KEY"  # cluster.auth reads the same variable on the server


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
    from pipeline.sampling import FIELD_NAMES

    request = make_request(
        "" if args.chat else args.prompt,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
        messages=[("user", args.prompt)] if args.chat else (),
        **{name: getattr(args, name) for name in FIELD_NAMES},
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
    from pipeline.config_flags import add_sampling_flags

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
            add_sampling_flags(p, "the deployment's serving defaults (`client info` shows them)")
            p.add_argument("--stop", action="append", help="a stop string (repeatable)")
            p.add_argument("--stream", action="store_true", help="stream the tokens as they come")
            p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=cmd_client)
