#!/usr/bin/env bash
# Build fedprge-client against the executorch pip wheel's runtime (build (a) of docs/devices.md §8).
#   clients/native/build.sh [BUILD_DIR]        default BUILD_DIR: clients/native/build
# Installs the Debian build packages if missing (setup.sh), generates the Fleet API's C++ protobuf sources from
# the installed flwr, writes the direction table next to the binary, and compiles. Python: $PYTHON or the
# repository's .venv (it must have flwr and executorch installed).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${1:-$HERE/build}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

"$HERE/setup.sh"
mkdir -p "$BUILD/proto"

# The Fleet messages, from the installed flwr's descriptors (the wheel ships no .proto files).
PROTOS=$("$PYTHON" "$HERE/fleet_proto.py" "$BUILD/proto/fleet.pb")
(cd "$BUILD/proto" && protoc --descriptor_set_in=fleet.pb --cpp_out=. $PROTOS)

read -r ET_WHEEL PY_LIBDIR PY_LIB < <("$PYTHON" - <<'PY'
import pathlib, sysconfig, executorch
lib = sysconfig.get_config_var("LDLIBRARY") or "libpython3.11.so"
print(list(executorch.__path__)[0], sysconfig.get_config_var("LIBDIR"), lib.removeprefix("lib").split(".so")[0])
PY
)

cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DFEDPRGE_RUNTIME=wheel \
    -DFLEET_PROTO_DIR="$BUILD/proto" -DEXECUTORCH_WHEEL="$ET_WHEEL" -DPYTHON_LIBDIR="$PY_LIBDIR" \
    -DPYTHON_LIBRARY_NAME="$PY_LIB" > "$BUILD/cmake.log"
cmake --build "$BUILD" -j "${JOBS:-2}" -- --no-print-directory
"$PYTHON" "$REPO/clients/vectors.py" --out "$BUILD" > /dev/null  # gaussian_table.f32 next to the binary
echo "built $BUILD/fedprge-client"
