"""Generate the Python code for ``proto/`` into ``wsgate/v1/``.

The one documented command::

    python -m wsgate.codegen            # regenerate in place
    python -m wsgate.codegen --check    # exit 1 if wsgate/v1 is stale against proto/

Generated files are committed, so running wsgate needs no code generator; the test suite
runs ``--check`` so a ``.proto`` change without regeneration fails CI. grpcio-tools and
mypy-protobuf are pinned exactly in ``pyproject.toml`` because their output is compared
byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_SUBDIR = Path("wsgate") / "v1"


class CodegenError(RuntimeError):
    """protoc failed or a tool it needs is missing."""


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The ``.proto`` sources, relative to ``proto_dir``, in a stable order."""
    return sorted(p.relative_to(proto_dir) for p in proto_dir.rglob("*.proto"))


def generate(out_root: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every source in ``proto_dir``, writing under ``out_root`` (the
    repository root when generating in place).

    Returns the generated files relative to ``out_root``. Raises CodegenError on failure.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CodegenError("grpcio-tools is not installed: pip install -e '.[test]'") from exc
    mypy_plugin = shutil.which("protoc-gen-mypy", path=sysconfig.get_path("scripts"))
    if mypy_plugin is None:
        mypy_plugin = shutil.which("protoc-gen-mypy")
    if mypy_plugin is None:
        raise CodegenError("protoc-gen-mypy not found: pip install -e '.[test]'")
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--mypy_out={out_root}",
        *(str(proto_dir / p) for p in proto_files(proto_dir)),
    ]
    if protoc.main(args) != 0:
        raise CodegenError("protoc failed; see the messages above")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE_SUBDIR).glob("*_pb2*"))


def stale_files(repo_root: Path = ROOT) -> list[str]:
    """Generate from ``repo_root/proto`` into a scratch directory and list the generated
    files that differ from those under ``repo_root``.

    An empty list means the committed code matches ``proto/``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch), repo_root / "proto")
        committed = sorted(
            p.relative_to(repo_root) for p in (repo_root / PACKAGE_SUBDIR).glob("*_pb2*")
        )
        differ = [str(p) for p in sorted(set(fresh) ^ set(committed))]
        for rel in set(fresh) & set(committed):
            if not filecmp.cmp(Path(scratch) / rel, repo_root / rel, shallow=False):
                differ.append(str(rel))
        return sorted(differ)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsgate.codegen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="only report stale generated files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        if stale:
            print("run: python -m wsgate.codegen", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(ROOT):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
