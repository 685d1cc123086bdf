"""The wire API: the committed stubs are current, and the service is what the ingress implements."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from ray._common.utils import import_attr

from cluster.app import SERVICER_FUNCTION
from cluster.ingress import GenerationIngress
from proto.binserve.v1 import codegen
from proto.binserve.v1 import generation_pb2 as pb
from proto.binserve.v1 import generation_pb2_grpc as pb_grpc

STUB_DIR = codegen.REPO_ROOT / codegen.PROTO_FILE.parent


def installed_grpcio_tools() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def test_committed_stubs_are_what_the_proto_generates_now(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    if installed_grpcio_tools() == pb_grpc.GRPC_GENERATED_VERSION:
        for path in fresh:
            committed = STUB_DIR / path.name
            assert committed.read_bytes() == path.read_bytes(), (
                f"{committed.name} is stale: run `python -m proto.binserve.v1.codegen` (make proto)"
            )
    # Whatever the tool version: the committed module must embed the .proto's current descriptor.
    descriptor_set = tmp_path / "generation.pb"
    codegen.run_protoc(tmp_path, f"--descriptor_set_out={descriptor_set}")
    [current] = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    for message in current.message_type:
        for field in message.field:
            field.ClearField("json_name")  # derived from the name; the Python stubs leave it out
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == current, "the stubs are stale: run `python -m proto.binserve.v1.codegen` (make proto)"


def test_the_lock_pins_the_grpc_tools_the_stubs_were_generated_with() -> None:
    """`make lock` upgrades grpcio-tools and regenerates the stubs together; what matters at run time (the stubs
    load under the installed runtime and describe the current .proto) is checked above for any version."""
    assert Path(grpc_tools.__file__).is_file()
    lock = (codegen.REPO_ROOT / "constraints.txt").read_text()
    pinned = re.findall(r"^grpcio-tools==(\S+)", lock, flags=re.MULTILINE)
    assert pinned == [pb_grpc.GRPC_GENERATED_VERSION], "regenerate the stubs: make lock (or make proto)"


def test_servicer_function_is_importable_by_the_path_serve_uses() -> None:
    assert import_attr(SERVICER_FUNCTION) is pb_grpc.add_GenerationServicer_to_server


def test_the_service_has_unary_streaming_and_info_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "binserve.v1.Generation"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "GetModelInfo"}
    assert not methods["Generate"].server_streaming
    assert methods["GenerateStream"].server_streaming and not methods["GenerateStream"].client_streaming
    assert methods["GenerateStream"].output_type.name == "GenerateResponse"
    assert methods["GetModelInfo"].output_type.name == "ModelInfo"


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (
            pb.GenerateRequest,
            {
                "prompt",
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "stop",
                "ignore_eos",
                "request_id",
                "messages",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
            },
        ),
        (
            pb.GenerateResponse,
            {
                "text",
                "token_ids",
                "finish_reason",
                "usage",
                "ttft_s",
                "total_s",
                "predicted_output_tokens",
                "bin",
            },
        ),
        (
            pb.ModelInfo,
            {
                "model",
                "max_model_len",
                "num_bins",
                "bin_boundaries",
                "pool_of_bin",
                "pp_size",
                "has_chat_template",
                "sampling_defaults",
            },
        ),
        (pb.ChatMessage, {"role", "content"}),
        (pb.Usage, {"num_prompt_tokens", "num_output_tokens", "num_cached_prompt_tokens"}),
    ],
)
def test_messages_carry_the_documented_fields(message, fields: set[str]) -> None:
    assert fields <= set(message.DESCRIPTOR.fields_by_name)


OPTIONAL_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@pytest.mark.parametrize("name", OPTIONAL_FIELDS)
def test_optional_fields_distinguish_unset_from_zero(name: str) -> None:
    request = pb.GenerateRequest(prompt="x")
    assert not request.HasField(name)  # unset: the deployment's serving default
    setattr(request, name, 0)
    assert request.HasField(name)  # an explicit 0 is used (or refused), not replaced by the default


def test_the_ingress_implements_every_rpc_by_name() -> None:
    ingress = GenerationIngress.func_or_class
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        impl = getattr(ingress, method.name)
        # Serve's proxy calls the method named like the RPC; a streaming RPC needs a generator.
        assert inspect.isasyncgenfunction(impl) == method.server_streaming, method.name
        assert "grpc_context" in inspect.signature(impl).parameters
