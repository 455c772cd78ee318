"""Regenerate the Python stubs from proto/ (`python -m tools.genproto`), or
check that the committed ones are current (`python -m tools.genproto --check`).

The stubs are written beside their .proto files (proto/gpumesh/v1/*_pb2*.py)
and installed as the `gpumesh.v1` package.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
API_DIR = PROTO_ROOT / "gpumesh" / "v1"


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc (from grpcio-tools) over every .proto; return the files written."""
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in API_DIR.glob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "gpumesh" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        (out / "gpumesh" / "v1").mkdir(parents=True)
        generated = generate(out)
        stale = []
        for path in generated:
            target = API_DIR / path.name
            if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                stale.append(target.name)
                if not args.check:
                    shutil.copyfile(path, target)
        names = {p.name for p in generated}
        extra = [p.name for p in API_DIR.glob("*_pb2*.py*") if p.name not in names]
    if args.check:
        if stale or extra:
            print(f"stale generated stubs: {', '.join(stale + extra)}; run `python -m tools.genproto`",
                  file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    for name in extra:
        (API_DIR / name).unlink()
    print(f"regenerated {len(stale)} file(s) in {API_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
