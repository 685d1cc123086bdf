"""Fixtures of the multi-node tests: the tiny chat model (the parent conftest writes the checkpoints).

These tests start ``ray.cluster_utils`` clusters, which cannot live beside the main suite's Ray cluster in
one process: ``tests/conftest.py`` leaves this directory out unless it is named, and ``make
test-multinode`` runs it in its own pytest process.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def chat_model(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a ChatML template, so the served path can render conversations."""
    from tests.test_chat import make_chat_model

    return make_chat_model(tiny_llama, tmp_path_factory.mktemp("multinode") / "tiny-chat")
