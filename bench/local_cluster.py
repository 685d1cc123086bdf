"""A Ray cluster of several nodes on one machine, and binserve's GPU config made small to serve on it.

    with multinode_cluster(num_gpu_nodes=2, cpus_per_gpu_node=2) as nodes:
        with deployed(model_dir) as served:              # deploy/serve-gpu.yaml, small, HeadOnly proxy
            replicas = replicas_by_node()               # {node_id: [ReplicaActor, ...]}
            nodes.remove(nodes.node_of(node_id))        # a node lost: raylet and every worker, SIGKILL

Each node is its own raylet (``ray.cluster_utils.Cluster``). The head node stands for a real cluster's
CPU head (Serve's controller and proxy, maybe an ingress replica); each worker node declares one GPU: Ray's
GPU resource with no device behind it, standing for the GPU node type. Models run on the CPU
(``model.device: cpu``), so a replica that asks for a GPU (``pools.num_gpus``) lands on a GPU node, as
on a real cluster, and runs there on the CPU.

This process is the cluster's driver. Such a cluster cannot live beside another Ray cluster in one
process: tests/multinode runs in its own pytest process (``make test-multinode``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import write_report

HEAD_CPUS = 1
SERVE_GPU = Path(__file__).resolve().parents[1] / "deploy" / "serve-gpu.yaml"
APP_NAME = "binserve"
MAX_QUEUED_REQUESTS = 16
PREFER_LOCAL_NODE_ROUTING = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"
RAY_ENV = {"RAY_timeout_ms_task_wait_for_death_info": "0"}
"""Ray's settings for every process of the cluster (read from the environment, which the raylets pass to
their workers), as KubeRay sets them for a RayService: a call to an actor whose connection broke fails at
once instead of waiting up to 1 s (Ray's default) for the GCS to report the actor dead. A lost node's calls
ended after about 2 s with the wait, 0.4 s without (docs/RELIABILITY.md)."""


@dataclass
class MultiNodeCluster:
    cluster: Any
    """The ``ray.cluster_utils.Cluster``."""
    gpu_nodes: list = field(default_factory=list)
    """The worker nodes (``ray._private.node.Node``) still up, in the order they were added."""

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def add_gpu_node(self, num_cpus: int) -> Any:
        node = _started(lambda: self.cluster.add_node(num_cpus=num_cpus, num_gpus=1))
        self.cluster.wait_for_nodes()
        self.gpu_nodes.append(node)
        return node

    def node_of(self, node_id: str) -> Any:
        [node] = [n for n in self.gpu_nodes if n.node_id == node_id]
        return node

    def remove(self, node: Any) -> float:
        """Kill the node at once, as a crashed machine: every worker process and the raylet, SIGKILL.
        Returns when the processes were killed (``time.monotonic()``): the moment of the loss, after the
        look-up of the node's actors in the GCS (under load it takes a while).

        ``Cluster.remove_node(allow_graceful=False)`` alone kills the raylet and its object store, but the
        worker processes live on until they notice (seconds): meanwhile their actors keep serving calls
        over their own connections, which a lost machine would not."""
        pids = actor_pids_on(node.node_id)
        killed_at_s = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.gpu_nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        return killed_at_s


@contextlib.contextmanager
def multinode_cluster(num_gpu_nodes: int = 2, cpus_per_gpu_node: int = 2) -> Iterator[MultiNodeCluster]:
    """A head node of ``HEAD_CPUS`` CPUs and ``num_gpu_nodes`` GPU-type worker nodes, this process its
    driver; everything is shut down afterwards."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private.constants import SERVE_NAMESPACE

    with _environment(RAY_ENV):
        cluster = Cluster()
        gcs_address = _start_head(cluster, lambda address: {})
        nodes = MultiNodeCluster(cluster)
        try:
            for _ in range(num_gpu_nodes):
                nodes.add_gpu_node(cpus_per_gpu_node)
            ray.init(address=cluster.address, namespace=SERVE_NAMESPACE, log_to_driver=False)
            yield nodes
        finally:
            ray.shutdown()
            cluster.shutdown()
            _kill_processes_of(gcs_address)  # a worker raylet from a try that timed out, if any


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment with ``env`` set (the processes it starts inherit it), restored after."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_head(cluster: Any, head_args: Callable[[str], dict], attempts: int = 3) -> str:
    """Start the head node on a free port (``head_args(gcs_address)`` adds arguments); a try that times
    out is ended, its processes killed, and the next gets another port. Returns the GCS address."""
    from ray._private.services import get_node_ip_address

    from cluster.local import free_port

    for attempt in range(attempts):
        port = free_port()
        gcs_address = f"{get_node_ip_address()}:{port}"
        try:
            args = {"num_cpus": HEAD_CPUS, "include_dashboard": False, **head_args(gcs_address)}
            cluster.add_node(gcs_server_port=port, **args)
            return gcs_address
        except Exception as exc:  # Ray raises a bare Exception ("timed out during startup")
            _kill_processes_of(gcs_address)
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _kill_processes_of(gcs_address: str) -> None:
    """Kill this cluster's Ray processes that no ``Node`` object ends: the GCS and raylets of a try that
    timed out, the fake provider's raylets (started without a reaper), and every process under them. Only
    processes whose command line names this cluster's GCS address or port are touched."""
    import psutil

    port = gcs_address.rsplit(":", 1)[1]
    markers = (gcs_address, f"--gcs_server_port={port}")
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if any(marker in cmdline for marker in markers) and ("raylet" in cmdline or "gcs_server" in cmdline):
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in process.children(recursive=True):
                    child.kill()
                process.kill()


def _started(start: Callable[[], Any], attempts: int = 3) -> Any:
    """``start()``, tried again when the raylet does not register within Ray's fixed 30 s (it happens on
    this machine's 2 cores when other jobs load them); Ray's reaper ends what a failed try left."""
    for attempt in range(attempts):
        try:
            return start()
        except Exception as exc:  # Ray raises a bare Exception ("timed out during startup")
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# ---- where the actors are (Ray's actor table in the GCS: no dashboard needed) ------------------------


@dataclass(frozen=True)
class ActorInfo:
    actor_id: str
    class_name: str
    """Serve's replicas are ``ServeReplica:<app>:<deployment>``."""
    node_id: str
    pid: int
    name: str


def alive_actors() -> list[ActorInfo]:
    import ray

    table = ray._private.state.actors()  # the GCS's actor table (a debugging API of Ray's)
    return [
        ActorInfo(actor_id, a["ActorClassName"], a["Address"]["NodeID"], a["Pid"], a["Name"])
        for actor_id, a in table.items()
        if a["State"] == "ALIVE"
    ]


def actor_pids_on(node_id: str) -> list[int]:
    return [a.pid for a in alive_actors() if a.node_id == node_id]


def replicas_by_node(deployment: str) -> dict[str, list[ActorInfo]]:
    """The deployment's live replica actors, by node."""
    by_node: dict[str, list[ActorInfo]] = defaultdict(list)
    for actor in alive_actors():
        if actor.class_name == f"ServeReplica:{APP_NAME}:{deployment}":
            by_node[actor.node_id].append(actor)
    return dict(by_node)


def replica_stats(replica: ActorInfo) -> Any:
    """An engine replica's ``EngineStats``, asked of that replica's actor directly (a deployment handle
    would pick a replica itself): Serve's own entry point for a handle call, with the request's metadata
    built here (an internal of Serve 2.60, like the actor table above)."""
    import pickle
    import uuid

    import ray
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.constants import SERVE_NAMESPACE

    request_id = uuid.uuid4().hex
    metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id, call_method="stats")
    try:
        actor = ray.get_actor(replica.name, namespace=SERVE_NAMESPACE)
    except ValueError as exc:  # listed alive a moment ago, dead now (its node lost)
        raise ReplicaGone(replica.name) from exc
    try:
        return ray.get(actor.handle_request.remote(pickle.dumps(metadata)), timeout=30)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, RuntimeError) and "initialize_callable" in str(exc.cause):
            raise ReplicaStarting(replica.name) from exc
        raise


class ReplicaGone(Exception):
    """The replica was listed alive but its actor can no longer be looked up: it died a moment ago (its
    node lost); Serve's actor table catches up, and a replacement is listed instead."""


class ReplicaStarting(Exception):
    """The replica's actor is alive but Serve has not yet built its deployment (a replacement starting:
    its model still loading); asked again later, it answers."""


def num_outstanding_requests(replica: ActorInfo) -> int:
    """Requests an engine replica holds."""
    return replica_stats(replica).num_unfinished_requests


# ---- deploy/serve-gpu.yaml made small ------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    address: str
    """HOST:PORT of the gRPC proxy on the head node."""
    config: dict
    """The Serve config deployed (``redeploy`` changes it)."""

    def redeploy(self, configure: Callable[[dict], None]) -> None:
        """Deploy this config changed by ``configure`` (a deployment's options: Serve updates it in place
        where it can, as ``serve deploy`` of an edited file does); waits until it runs."""
        from ray.serve.schema import ServeDeploySchema

        from cluster.local import deploy

        configure(self.config)
        deploy(ServeDeploySchema.model_validate(self.config), timeout_s=300)


def small_gpu_config(model_dir: str, grpc_port: int, http_port: int) -> dict:
    """deploy/serve-gpu.yaml for the tiny model here. The front door stays as the file has it (2 ingress
    replicas, one per node; the proxy's gate, the limits); the model runs on the CPU with small KV pools
    and batches, pools have a fixed size, and the proxy runs on the head only (every raylet here shares
    one IP address, so proxies on every node would all want the same ports). That proxy spreads its
    calls over both ingress replicas, as a production HeadOnly config should (docs/DEPLOY.md): Serve's
    proxy prefers replicas on its own node unless ``RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING`` is 0 in
    its process (read when Serve's constants are imported), and the proxies inherit the controller's
    ``runtime_env``."""
    raw = yaml.safe_load(SERVE_GPU.read_text())
    raw["proxy_location"] = "HeadOnly"
    raw["controller_options"]["runtime_env"]["env_vars"][PREFER_LOCAL_NODE_ROUTING] = "0"
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
    # The file's per-pool options name 4 pools, and this app has one: the code's defaults here (a test
    # sets what it needs: ``bench.scaling.with_engine_options``).
    raw["applications"][0].pop("deployments", None)
    return raw


@contextlib.contextmanager
def deployed(model_dir: str, configure: Callable[[dict], None] = lambda raw: None) -> Iterator[Served]:
    """Deploy the small config (``configure`` edits the raw config first) on the connected cluster, the
    way ``binserve serve --address`` does; Serve is shut down afterwards, the cluster left up."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from cluster.local import deploy, free_port

    grpc_port = free_port()
    raw = small_gpu_config(model_dir, grpc_port, free_port())
    configure(raw)
    try:
        deploy(ServeDeploySchema.model_validate(raw), timeout_s=300)
        yield Served(f"127.0.0.1:{grpc_port}", raw)
    finally:
        serve.shutdown()


# ---- the commands of the multi-node benchmarks ---------------------------------------------------------


def add_command_flags(p: argparse.ArgumentParser, scratch: str) -> None:
    """The flags of ``binserve bench node-loss`` and ``scaling``: the model, the scratch folder, the report."""
    p.add_argument("--model", help="checkpoint directory to serve (default: the tiny test model)")
    p.add_argument("--scratch", default=scratch, help="where the tiny model (and the autoscaler's config) go")
    p.add_argument("--json", help="write the report here")


def run_command(
    args: argparse.Namespace, measure: Callable[[dict, str], None], render: Callable[[dict], str]
) -> int:
    """Run ``measure(report, model_dir)`` (``--model``, or the tiny model written under ``--scratch``) with
    the report dated and the load average noted at its start and end; write it to ``--json``, print it."""
    from workers.tiny_model import make_tiny_model

    model_dir = args.model or str(make_tiny_model(Path(args.scratch) / "model", arch="llama", seed=0))
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg()[0],
    }
    measure(report, model_dir)
    report["load_average_at_end"] = os.getloadavg()[0]
    write_report(args.json, report)
    print(render(report))
    return 0


# ---- Ray's autoscaler on its fake multi-node provider ------------------------------------------------

GPU_NODE_TYPE = "gpu_node"


def fake_provider_config(gcs_address: str, cpus_per_gpu_node: int, max_gpu_nodes: int) -> dict:
    """The autoscaler's cluster config for Ray's fake multi-node provider (the wheel lacks the base file
    ``ray.cluster_utils.AutoscalingCluster`` reads): a head that holds no replica, and a GPU node type
    the autoscaler starts as raylets on this machine, joining ``gcs_address``."""
    return {
        "cluster_name": "binserve-fake",
        "max_workers": max_gpu_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # else it assumes <this host>:6379, which may be another's cluster
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            GPU_NODE_TYPE: {
                "resources": {"CPU": cpus_per_gpu_node, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_gpu_nodes,
            },
        },
        "docker": {},
        "auth": {"ssh_user": "ubuntu"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def autoscaling_cluster(
    config_dir: Path, cpus_per_gpu_node: int = 2, max_gpu_nodes: int = 2
) -> Iterator[MultiNodeCluster]:
    """A head node whose autoscaler starts and removes GPU nodes on demand (the fake provider's raylets
    on this machine), this process its driver. Unlike ``AutoscalingCluster.start`` this runs no
    ``ray stop --force`` (which would end every Ray cluster on the machine); afterwards the raylets the
    autoscaler started for this cluster, and their workers, are killed."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private.constants import SERVE_NAMESPACE

    def with_autoscaler(gcs_address: str) -> dict:
        config = fake_provider_config(gcs_address, cpus_per_gpu_node, max_gpu_nodes)
        config_path = config_dir / "autoscaler.yaml"
        config_path.write_text(yaml.safe_dump(config))
        return {"autoscaling_config": str(config_path)}

    # The autoscaler (Ray's monitor process, started with the head) reads these from its environment.
    with _environment({**RAY_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}):
        cluster = Cluster()
        gcs_address = ""
        try:
            gcs_address = _start_head(cluster, with_autoscaler)
            ray.init(address=cluster.address, namespace=SERVE_NAMESPACE, log_to_driver=False)
            yield MultiNodeCluster(cluster)
        finally:
            ray.shutdown()
            cluster.shutdown()
            if gcs_address:
                _kill_processes_of(gcs_address)  # the fake provider's raylets


def num_gpu_nodes_alive() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)
