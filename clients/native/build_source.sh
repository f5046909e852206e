#!/usr/bin/env bash
# NOT YET RUN. Build (b): fedprge-client standalone from ExecuTorch's sources (v1.4.1), XNNPACK included, no Python
# at run time. Written from the facts in shared/notes/native-client.md; it has not been run yet (a cold build takes
# about 45 min of both cores on the 2-core machines) - expect to fix details on its first run.
#   clients/native/build_source.sh [WORK_DIR]      default WORK_DIR: clients/native/build/source (git-ignored)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="${1:-$HERE/build/source}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
JOBS="${JOBS:-2}"
TAG=v1.4.1  # commit e4d02f41

"$HERE/setup.sh"
command -v git >/dev/null || { echo "build_source.sh: git is needed" >&2; exit 1; }
mkdir -p "$WORK"
SRC="$WORK/executorch"  # CMake insists on a folder named executorch
if [ ! -d "$SRC/.git" ]; then
    git clone --depth 1 --branch "$TAG" --no-checkout https://github.com/pytorch/executorch "$SRC"
    git -C "$SRC" sparse-checkout set --no-cone '/*' '!/examples/'  # examples/ holds LFS blobs that are missing
    git -C "$SRC" checkout
fi
git -C "$SRC" submodule update --init --depth 1 \
    third-party/flatbuffers third-party/flatcc third-party/json third-party/gflags \
    backends/xnnpack/third-party/XNNPACK backends/xnnpack/third-party/cpuinfo \
    backends/xnnpack/third-party/FXdiv backends/xnnpack/third-party/FP16 \
    backends/xnnpack/third-party/pthreadpool
git -C "$SRC/backends/xnnpack/third-party/pthreadpool" fetch --depth 1 origin 0e6ca137
git -C "$SRC/backends/xnnpack/third-party/pthreadpool" checkout 0e6ca137  # the commit XNNPACK's CMake pins

cmake -S "$SRC" -B "$WORK/et-build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$WORK/et-install" \
    -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON \
    -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON -DEXECUTORCH_BUILD_EXTENSION_NAMED_DATA_MAP=ON \
    -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=OFF \
    -DEXECUTORCH_BUILD_EXTENSION_EVALUE_UTIL=OFF -DEXECUTORCH_BUILD_EXTENSION_RUNNER_UTIL=OFF \
    -DEXECUTORCH_BUILD_DEVTOOLS=OFF -DEXECUTORCH_BUILD_XNNPACK=ON
cmake --build "$WORK/et-build" -j "$JOBS" --target extension_module_static extension_tensor portable_ops_lib xnnpack_backend
cmake --install "$WORK/et-build"

mkdir -p "$WORK/client/proto"
PROTOS=$("$PYTHON" "$HERE/fleet_proto.py" "$WORK/client/proto/fleet.pb")
(cd "$WORK/client/proto" && protoc --descriptor_set_in=fleet.pb --cpp_out=. $PROTOS)
cmake -S "$HERE" -B "$WORK/client" -DCMAKE_BUILD_TYPE=Release -DFEDPRGE_RUNTIME=source \
    -DFLEET_PROTO_DIR="$WORK/client/proto" -DEXECUTORCH_SOURCE_BUILD="$WORK/et-install/lib/cmake/ExecuTorch"
cmake --build "$WORK/client" -j "$JOBS"
"$PYTHON" "$REPO/clients/vectors.py" --out "$WORK/client" > /dev/null
echo "built $WORK/client/fedprge-client"
