#!/usr/bin/env bash
# Build (b): fedprge-client standalone from ExecuTorch's sources (v1.4.1), portable kernels and XNNPACK linked in, no
# Python at run time (the build itself runs ExecuTorch's codegen with the project's venv). Re-running resumes. The
# sources are cloned from GitHub; where it is not reachable, map the URLs to local mirrors with git's
# `url.<mirror>.insteadOf` (e.g. in a file named by GIT_CONFIG_GLOBAL; a local mirror also needs
# `uploadpack.allowFilter` and `protocol.file.allow=always` there). A cold build took about 40 min of wall time on
# a 2-core machine beside other jobs; the binary needs only libc, libstdc++, libcurl, libcrypto and libprotobuf.
#   clients/native/build_source.sh [WORK_DIR]      default WORK_DIR: clients/native/build/source (git-ignored)
#   ARCH=arm64 clients/native/build_source.sh      an aarch64 cross build (aarch64-linux-gnu.cmake) in the same
#                                                  WORK_DIR, the sources shared; here it runs under qemu-user
#                                                  (client-arm64/fedprge-client-qemu, the same arguments)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="${1:-$HERE/build/source}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
JOBS="${JOBS:-2}"
TAG=v1.4.1  # commit e4d02f41
ARCH="${ARCH:-host}"
case "$ARCH" in
    host) SUFFIX="" CROSS=() ;;
    # KleidiAI (Arm's int8/int4 matmul kernels for XNNPACK) is downloaded at configure time, and these fp32 programs
    # do not use it: off
    arm64) SUFFIX="-arm64"
        CROSS=(-DCMAKE_TOOLCHAIN_FILE="$HERE/aarch64-linux-gnu.cmake" -DEXECUTORCH_XNNPACK_ENABLE_KLEIDI=OFF) ;;
    *) echo "build_source.sh: ARCH=$ARCH is not one of host, arm64" >&2; exit 2 ;;
esac

"$HERE/setup.sh" ${SUFFIX:+--arm64}
command -v git >/dev/null || { echo "build_source.sh: git is needed" >&2; exit 1; }
mkdir -p "$WORK"
SRC="$WORK/executorch"  # CMake insists on a folder named executorch
if [ ! -d "$SRC/.git" ]; then
    # blobless: only the blobs checked out are fetched (a mirror may lack the large ones under examples/)
    git clone --depth 1 --filter=blob:none --branch "$TAG" --no-checkout https://github.com/pytorch/executorch "$SRC"
    git -C "$SRC" sparse-checkout set --no-cone '/*' '!/examples/'  # examples/ holds LFS blobs that are missing
    git -C "$SRC" checkout
fi
git -C "$SRC" submodule update --init --depth 1 \
    third-party/flatbuffers third-party/flatcc third-party/gflags \
    backends/xnnpack/third-party/XNNPACK backends/xnnpack/third-party/cpuinfo \
    backends/xnnpack/third-party/FXdiv backends/xnnpack/third-party/FP16
pinned() {  # pinned URL DIR REF: DIR holds URL's REF (a full commit hash, or "tag NAME"), in place of a submodule
    [ -e "$2/.git" ] || { rm -rf "$2"; git clone --filter=blob:none --no-checkout "$1" "$2"; }
    git -C "$2" fetch --depth 1 origin $3
    git -C "$2" checkout --detach FETCH_HEAD
}
# pthreadpool at the commit XNNPACK's CMake pins (the submodule's own commit is not needed, and gone upstream)
pinned https://github.com/google/pthreadpool.git "$SRC/backends/xnnpack/third-party/pthreadpool" \
    0e6ca13779b57d397a5ba6bfdcaa8a275bc8ea2e
# nlohmann/json: ExecuTorch's third-party CMake adds it though this build uses none of it; release v3.11.3 serves
pinned https://github.com/nlohmann/json.git "$SRC/third-party/json" "tag v3.11.3"

# ExecuTorch's kernel registration is generated at build time by its codegen, which needs torchgen (torch) and the
# executorch package: the project's venv has both
ET_BUILD="$WORK/et-build$SUFFIX" ET_INSTALL="$WORK/et-install$SUFFIX" CLIENT="$WORK/client$SUFFIX"
cmake -S "$SRC" -B "$ET_BUILD" "${CROSS[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$ET_INSTALL" \
    -DPYTHON_EXECUTABLE="$PYTHON" -DPython3_EXECUTABLE="$PYTHON" \
    -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON \
    -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON -DEXECUTORCH_BUILD_EXTENSION_NAMED_DATA_MAP=ON \
    -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=OFF \
    -DEXECUTORCH_BUILD_EXTENSION_EVALUE_UTIL=OFF -DEXECUTORCH_BUILD_EXTENSION_RUNNER_UTIL=OFF \
    -DEXECUTORCH_BUILD_DEVTOOLS=OFF -DEXECUTORCH_BUILD_XNNPACK=ON
cmake --build "$ET_BUILD" -j "$JOBS"  # everything configured: `cmake --install` needs every library it lists
cmake --install "$ET_BUILD"

mkdir -p "$CLIENT/proto"
PROTOS=$("$PYTHON" "$HERE/fleet_proto.py" "$CLIENT/proto/fleet.pb")
(cd "$CLIENT/proto" && protoc --descriptor_set_in=fleet.pb --cpp_out=. $PROTOS)
cmake -S "$HERE" -B "$CLIENT" "${CROSS[@]}" -DCMAKE_BUILD_TYPE=Release -DFEDPRGE_RUNTIME=source \
    -DFLEET_PROTO_DIR="$CLIENT/proto" -DEXECUTORCH_SOURCE_BUILD="$ET_INSTALL/lib/cmake/ExecuTorch"
cmake --build "$CLIENT" -j "$JOBS"
"$PYTHON" "$REPO/clients/vectors.py" --out "$CLIENT" > /dev/null
if [ "$ARCH" = arm64 ]; then  # the same command line on this machine, under qemu-user: usable wherever a binary is
    # No -L /usr/aarch64-linux-gnu: its loader (the cross toolchain's glibc) would run with the multiarch libc.so.6 of
    # libc6:arm64 that the arm64 libraries pull in, a different build whose private loader data does not match, and
    # the first pthread_create then loops forever. Without -L, loader and libc both come from libc6:arm64.
    printf '#!/bin/sh\nexec qemu-aarch64 "$(dirname "$0")/fedprge-client" "$@"\n' \
        > "$CLIENT/fedprge-client-qemu"
    chmod +x "$CLIENT/fedprge-client-qemu"
    echo "built $CLIENT/fedprge-client (aarch64; here: $CLIENT/fedprge-client-qemu)"
else
    echo "built $CLIENT/fedprge-client"
fi
