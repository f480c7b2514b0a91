"""The one entry point that generates the Python code for protos/ (run by `make proto`).

Usage: python -m clients.codegen [OUT_DIR]   (default: clients/pb)
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients" / "pb"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py into out_dir; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for path in sorted(out_dir.rglob("*_pb2*.py*")):
        # protoc writes absolute imports rooted at protos/ ("from imagegateway.v1 import ...");
        # relative imports let the generated package live inside clients.pb.
        text = path.read_text()
        for proto in protos:
            module = proto.removesuffix(".proto").replace("/", ".")
            package, _, name = module.rpartition(".")
            text = text.replace(f"from {package} import {name}_pb2", f"from . import {name}_pb2")
        path.write_text(text)
        written.append(path)
    for directory in {p.parent for p in written} | {out_dir}:
        for parent in [directory, *directory.parents]:
            if parent == out_dir.parent:
                break
            (parent / "__init__.py").touch()
    return written


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out))


if __name__ == "__main__":
    main()
