"""A Ray cluster of several nodes on one machine: a head and GPU-type worker nodes, each its own raylet.

    with multinode_cluster(num_gpu_nodes=2, cpus_per_gpu_node=3) as nodes:
        nodes.gpu_nodes[0].node_id               # the Ray node id of a worker
        nodes.remove(nodes.gpu_nodes[0])         # kill its raylet and every worker process at once

The head node stands for the CPU head of a real cluster (Serve's controller and proxy, the ingress);
each worker node declares one GPU: Ray's GPU resource with no device behind it, standing for the GPU
node type. Models run on the CPU (``model.device: cpu``), so a replica that asks for a GPU
(``pools.num_gpus: 1``) lands on a GPU node, as on a real cluster, and runs there on the CPU.

This process is the cluster's driver. ``ray.cluster_utils`` clusters cannot live beside another Ray
cluster in one process, so these tests run in their own pytest process (``make test-multinode``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

HEAD_CPUS = 1


@dataclass
class MultiNodeCluster:
    cluster: object
    """The ``ray.cluster_utils.Cluster``."""
    gpu_nodes: list = field(default_factory=list)
    """The worker nodes (``ray._private.node.Node``), in the order they were added."""

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def add_gpu_node(self, num_cpus: int) -> object:
        node = self.cluster.add_node(num_cpus=num_cpus, num_gpus=1)
        self.cluster.wait_for_nodes()
        self.gpu_nodes.append(node)
        return node

    def remove(self, node: object) -> None:
        """Kill the node at once (its raylet and every worker process: no graceful shutdown)."""
        self.gpu_nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def node_of(self, node_id: str) -> object:
        [node] = [n for n in self.gpu_nodes if n.node_id == node_id]
        return node


@contextlib.contextmanager
def multinode_cluster(num_gpu_nodes: int = 2, cpus_per_gpu_node: int = 3) -> Iterator[MultiNodeCluster]:
    """A head node of ``HEAD_CPUS`` CPUs and ``num_gpu_nodes`` worker nodes, this process its driver;
    everything is shut down afterwards."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private.constants import SERVE_NAMESPACE

    from tools.serve_cli import free_port

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False, "gcs_server_port": free_port()},
    )
    nodes = MultiNodeCluster(cluster)
    try:
        for _ in range(num_gpu_nodes):
            nodes.add_gpu_node(cpus_per_gpu_node)
        ray.init(address=cluster.address, namespace=SERVE_NAMESPACE, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
