"""The committed generated code is exactly what `make proto` makes from protos/ today."""

from __future__ import annotations

from pathlib import Path

from clients import codegen


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    committed = codegen.DEFAULT_OUT
    codegen.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    current = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(current), "run `make proto`"
    stale = [str(name) for name in fresh if fresh[name] != current[name]]
    assert stale == [], f"stale generated files {stale}: run `make proto`"


def test_every_proto_is_generated() -> None:
    for proto in codegen.proto_files():
        rel = proto.relative_to(codegen.PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (codegen.DEFAULT_OUT / f"{rel}{suffix}").is_file()
