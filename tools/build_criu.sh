#!/usr/bin/env bash
# Build and install CRIU 4.x, which gpumesh's transparent checkpointing needs (Debian bookworm's
# criu 3.17 fails on current kernels: every dump stops in vDSO detection, CRIU issue 2532, fixed in 4.1).
# The release tarball comes from Debian's archive and is checked against its SHA-256.
#
#   tools/build_criu.sh [PREFIX]        # installs PREFIX/sbin/criu (default /usr/local); needs root for apt
#
# Does nothing when a criu >= 4 is already on PATH. About a minute on 2 cores. Exits non-zero when
# anything fails (CI's .ci/criu then fails CI: the transparent-migration tests must not silently skip).
set -euo pipefail
VERSION=4.1.1
SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
URL="http://deb.debian.org/debian/pool/main/c/criu/criu_${VERSION}.orig.tar.xz"
PREFIX="${1:-/usr/local}"

if command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -Eq 'Version: ([4-9]|[1-9][0-9])\.'; then
  echo "criu $(criu --version | awk '/Version/ {print $2}') is already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq curl ca-certificates build-essential pkg-config libprotobuf-dev libprotobuf-c-dev \
  protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev \
  libgnutls28-dev uuid-dev libaio-dev >/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
curl -sSfLo "$work/criu.tar.xz" "$URL"
echo "$SHA256  $work/criu.tar.xz" | sha256sum -c --quiet -
tar -C "$work" -xf "$work/criu.tar.xz"
make -s -C "$work/criu-$VERSION" -j"$(nproc)" criu >/dev/null
install -D -m 0755 "$work/criu-$VERSION/criu/criu" "$PREFIX/sbin/criu"
"$PREFIX/sbin/criu" --version | head -1
# CI and the agent find criu on PATH: an install they cannot find is a failed build.
if ! command -v criu >/dev/null 2>&1 || ! criu --version 2>/dev/null | grep -Eq 'Version: ([4-9]|[1-9][0-9])\.'; then
  echo "installed $PREFIX/sbin/criu, but the criu on PATH ($(command -v criu || echo none)) is not it: add $PREFIX/sbin to PATH" >&2
  exit 1
fi
