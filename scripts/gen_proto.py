"""Regenerate the committed protobuf / gRPC Python code in k2serve/proto/ with grpc_tools.protoc.

    python scripts/gen_proto.py               # rewrite k2serve/proto/*_pb2*.py and *.pyi in place
    python scripts/gen_proto.py --out DIR     # write DIR/k2serve/proto/... instead (staleness test)

The .proto files import each other as "k2serve/proto/x.proto" and protoc runs with the repository
root as its include path, so generated modules import their dependencies as
`from k2serve.proto import x_pb2`. Any top-level `import x_pb2` that protoc still emits is rewritten
to that package form, and the script fails if one is left.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("k2serve/proto")  # relative to the include root
PACKAGE = "k2serve.proto"
_TOP_LEVEL_IMPORT = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.MULTILINE)


class ProtoGenError(RuntimeError):
    """protoc failed, or its output still has a top-level import; carries the offending detail."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """The .proto files, relative to `root`, sorted."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).glob("*.proto"))


def generated_files(out_root: Path) -> list[Path]:
    """Generated files under out_root/k2serve/proto, relative to out_root, sorted."""
    gen = out_root / PROTO_DIR
    paths = [*gen.glob("*_pb2.py"), *gen.glob("*_pb2_grpc.py"), *gen.glob("*_pb2.pyi")]
    return sorted(p.relative_to(out_root) for p in paths)


def _fix_imports(path: Path) -> None:
    text = path.read_text()
    fixed = _TOP_LEVEL_IMPORT.sub(lambda m: f"from {PACKAGE} import {m.group(1)}{m.group(2) or ''}", text)
    if fixed != text:
        path.write_text(fixed)


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto file, writing into out_root/k2serve/proto; returns the files written."""
    from grpc_tools import protoc  # build-time dependency only

    (out_root / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    code = protoc.main(args)
    if code != 0:
        raise ProtoGenError(f"grpc_tools.protoc exited with code {code}")
    for rel in generated_files(out_root):
        path = out_root / rel
        if rel.name.endswith("_pb2_grpc.py") and "class " not in path.read_text():
            path.unlink()  # a .proto without services: protoc writes an empty stub module
            continue
        _fix_imports(path)
        left = _TOP_LEVEL_IMPORT.search(path.read_text())
        if left:
            raise ProtoGenError(f"top-level import left in {rel}: {left.group(0)!r}")
    return generated_files(out_root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write k2serve/proto/ under")
    args = parser.parse_args(argv)
    for rel in generate(args.out):
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
