"""Write the FileDescriptorSet of Flower's Fleet API messages, taken from the installed flwr's ``_pb2`` modules.

    python clients/native/fleet_proto.py OUT.pb

The flwr wheel ships compiled ``_pb2`` modules but no ``.proto`` files; ``protoc --descriptor_set_in=OUT.pb
--cpp_out=DIR flwr/proto/fleet.proto ...`` generates the C++ messages of exactly the installed Flower version.
"""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

MODULES = ("fleet", "heartbeat", "message", "recorddict", "error", "node")


def closure(files: list[FileDescriptor]) -> list[FileDescriptor]:
    """``files`` and every file they import, dependencies first (the order protoc needs)."""
    out: list[FileDescriptor] = []

    def visit(fd: FileDescriptor) -> None:
        if fd.name in {f.name for f in out}:
            return
        for dep in fd.dependencies:
            visit(dep)
        out.append(fd)

    for fd in files:
        visit(fd)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    import importlib

    files = [importlib.import_module(f"flwr.proto.{m}_pb2").DESCRIPTOR for m in MODULES]
    fds = descriptor_pb2.FileDescriptorSet()
    for fd in closure(files):
        fds.file.add().ParseFromString(fd.serialized_pb)
    Path(argv[0]).write_bytes(fds.SerializeToString())
    print(" ".join(f.name for f in fds.file))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
