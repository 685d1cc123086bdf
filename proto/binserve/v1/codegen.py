"""Regenerate the Python stubs of ``generation.proto`` with grpcio-tools.

    python -m proto.binserve.v1.codegen            # rewrites proto/binserve/v1/generation_pb2*.py

The .proto is compiled relative to the repository root, so the stubs import each other as
``proto.binserve.v1...``: the package path that Ray Serve's gRPC proxy imports
``add_GenerationServicer_to_server`` from.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_FILE = Path("proto/binserve/v1/generation.proto")
"""The .proto, relative to ``REPO_ROOT`` (which is also its import root)."""
GENERATED_NAMES: tuple[str, ...] = ("generation_pb2.py", "generation_pb2_grpc.py")


def run_protoc(out_dir: Path, *extra_args: str) -> None:
    """Compile ``PROTO_FILE`` into ``out_dir`` (which mirrors the repository layout)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={well_known}",
        *extra_args,
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Write the message and service modules under ``out_dir``; return their paths. (No ``.pyi``: the
    ruff exclusion covers only the generated ``.py`` files.)"""
    run_protoc(out_dir, f"--python_out={out_dir}", f"--grpc_python_out={out_dir}")
    return [out_dir / PROTO_FILE.parent / name for name in GENERATED_NAMES]


def main() -> int:
    for path in generate():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
