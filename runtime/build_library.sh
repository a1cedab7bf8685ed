#!/usr/bin/env bash
# Build runtime/build/libseif_ort.so, the ai.seif custom-op library for ONNX Runtime.
#
#   runtime/build_library.sh            # CUDA kernels too when nvcc is found
#   SEIF_WITH_CUDA=OFF runtime/build_library.sh   # CPU only
#   SEIF_WITH_CUDA=ON  runtime/build_library.sh   # fail if nvcc is missing
#
# ONNX Runtime's C/C++ API headers come from Debian trixie's libonnxruntime-dev, fetched once
# into runtime/third_party/ (git-ignored by its own .gitignore) with a PRIVATE apt
# configuration: /etc/apt is never touched. Set ORT_INCLUDE_DIR to use headers from elsewhere.
# Nothing links against libonnxruntime: the library gets the API table from ORT at load time.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
THIRD="$HERE/third_party"
BUILD="${SEIF_BUILD_DIR:-$HERE/build}"
ORT_SUITE="${SEIF_ORT_SUITE:-trixie}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

fetch_headers() {
    local dest="$THIRD/onnxruntime"
    if [ -f "$dest/include/onnxruntime_cxx_api.h" ]; then
        return 0
    fi
    echo "build_library: fetching ONNX Runtime headers (Debian $ORT_SUITE libonnxruntime-dev)"
    mkdir -p "$THIRD"
    printf '*\n' > "$THIRD/.gitignore"
    local apt="$THIRD/apt"
    rm -rf "$apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources.list.d" "$apt/debs"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-$ORT_SUITE-stable.gpg
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $ORT_SUITE main" \
        > "$apt/sources.list"
    local opts=(
        -o "Dir::Etc::sourcelist=$apt/sources.list"
        -o "Dir::Etc::sourceparts=$apt/sources.list.d"
        -o "Dir::State::Lists=$apt/lists"
        -o "Dir::Cache=$apt/cache"
        -o "Dir::State::status=/dev/null"
        -o "APT::Architecture=amd64"
        -o "Debug::NoLocking=1"
        -o "APT::Get::List-Cleanup=0"
    )
    if [ "$(id -u)" = 0 ]; then
        opts+=(-o "APT::Sandbox::User=root")
    fi
    if ! command -v apt-get >/dev/null 2>&1 \
            || ! apt-get -qq "${opts[@]}" update \
            || ! (cd "$apt/debs" && apt-get -qq "${opts[@]}" download libonnxruntime-dev); then
        echo "build_library: could not fetch libonnxruntime-dev from Debian $ORT_SUITE;" \
             "set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h" >&2
        exit 1
    fi
    local deb
    deb="$(ls "$apt/debs"/libonnxruntime-dev_*.deb | head -n1)"
    rm -rf "$apt/root"
    dpkg-deb -x "$deb" "$apt/root"
    local inc="$apt/root/usr/include/onnxruntime"
    if [ ! -f "$inc/onnxruntime_cxx_api.h" ]; then
        echo "build_library: $deb has no onnxruntime_cxx_api.h" >&2
        exit 1
    fi
    rm -rf "$dest"
    mkdir -p "$dest"
    cp -r "$inc" "$dest/include"
    basename "$deb" > "$dest/VERSION"
    rm -rf "$apt"
}

if [ -z "${ORT_INCLUDE_DIR:-}" ]; then
    fetch_headers
    ORT_INCLUDE_DIR="$THIRD/onnxruntime/include"
fi

WITH_CUDA="${SEIF_WITH_CUDA:-AUTO}"
if [ "$WITH_CUDA" = "AUTO" ]; then
    if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
        WITH_CUDA=ON
    else
        WITH_CUDA=OFF
    fi
fi
if [ "$WITH_CUDA" = "ON" ] && ! command -v nvcc >/dev/null 2>&1 \
        && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
fi

cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR" -DSEIF_WITH_CUDA="$WITH_CUDA" ${SEIF_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "$JOBS"
echo "build_library: built $BUILD/libseif_ort.so (CUDA $WITH_CUDA)"
