"""The generated code in wsgate/v1 must match proto/."""

from __future__ import annotations

import shutil
from pathlib import Path

from wsgate import codegen


def test_generated_code_is_current() -> None:
    stale = codegen.stale_files()
    assert stale == [], f"run `python -m wsgate.codegen`; stale: {stale}"


def test_a_proto_change_without_regeneration_is_caught(tmp_path: Path) -> None:
    shutil.copytree(codegen.ROOT / "proto", tmp_path / "proto")
    shutil.copytree(codegen.ROOT / "wsgate" / "v1", tmp_path / "wsgate" / "v1")
    assert codegen.stale_files(tmp_path) == []
    envelope = tmp_path / "proto" / "wsgate" / "v1" / "envelope.proto"
    envelope.write_text(
        envelope.read_text() + "\n// A probe.\nmessage Probe {\n  // x.\n  bool x = 1;\n}\n"
    )
    assert "wsgate/v1/envelope_pb2.py" in codegen.stale_files(tmp_path)


def test_every_proto_message_and_field_is_commented() -> None:
    for path in (codegen.ROOT / "proto").rglob("*.proto"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            declares = stripped.startswith(("message ", "enum ", "service ", "rpc ", "oneof "))
            is_field = (
                "=" in stripped
                and stripped.endswith(";")
                and not stripped.startswith(("syntax", "package", "option", "//", "reserved"))
            )
            if declares or is_field:
                assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1}: {stripped}"
