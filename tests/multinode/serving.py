"""deploy/serve-gpu.yaml made small for a multi-node cluster on one machine, and deployed onto it.

The production front door stays as the file has it (2 ingress replicas, the proxy's gate, the same
limits); what changes: the tiny model on the CPU, small KV pools and batches, fixed pool sizes (the
autoscaling chain has its own test), and ``proxy_location: HeadOnly`` (every raylet here shares one IP
address, so proxies on every node would all want the same ports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

SERVE_GPU = Path(__file__).resolve().parents[2] / "deploy" / "serve-gpu.yaml"
APP_NAME = "binserve"
MAX_QUEUED_REQUESTS = 16


@dataclass(frozen=True)
class Served:
    address: str
    """HOST:PORT of the gRPC proxy on the head node."""

    def pool(self, pool_id: int):
        from ray import serve

        from cluster.app import pool_name

        return serve.get_deployment_handle(pool_name(pool_id), app_name=APP_NAME)


def small_gpu_config(model_dir: str, grpc_port: int, http_port: int) -> dict:
    raw = yaml.safe_load(SERVE_GPU.read_text())
    raw["proxy_location"] = "HeadOnly"
    raw["http_options"] = {"host": "127.0.0.1", "port": http_port}
    raw["grpc_options"]["port"] = grpc_port
    args = raw["applications"][0]["args"]
    args["model"] = {"model_dir": model_dir, "device": "cpu", "max_model_len": 4096}
    args["cache"] = {"kv_cache_bytes": 8 * 2**20}
    args["scheduler"].update(max_num_seqs=8, chunk_size=64)
    args["parallel"] = {"pp_size": 1}
    args["router"] = {"num_bins": 1}
    args["predictor"].update(num_cpus=0.1)
    # Each replica asks for half a (declared) GPU: two fit on one GPU node, so where they go is Serve's
    # choice (it spreads them), and a lost node's replica has room on a surviving one.
    args["pools"] = {
        "min_replicas": 2,
        "max_replicas": 2,
        "max_queued_requests": MAX_QUEUED_REQUESTS,
        "num_cpus": 0.5,
        "num_gpus": 0.5,
    }
    args["ingress"].update(max_prompt_tokens=None, num_cpus=0.1)
    return raw


@contextlib.contextmanager
def deployed(model_dir: str, configure: Callable[[dict], None] = lambda raw: None) -> Iterator[Served]:
    """Deploy the small config (``configure`` edits the raw config first) on the connected cluster, the
    way ``binserve serve --address`` does; Serve is shut down afterwards, the cluster left up."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from tools.serve_cli import deploy, free_port

    grpc_port = free_port()
    raw = small_gpu_config(model_dir, grpc_port, free_port())
    configure(raw)
    try:
        deploy(ServeDeploySchema.model_validate(raw), timeout_s=300)
        yield Served(f"127.0.0.1:{grpc_port}")
    finally:
        serve.shutdown()
