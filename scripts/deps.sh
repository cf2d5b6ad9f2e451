#!/bin/sh
# Install the Debian packages libkv needs to build and test, if any are
# missing. As root it runs apt-get; otherwise it prints the exact command
# and fails. Quiet when everything is already there.
set -eu

PACKAGES="meson ninja-build pkg-config gcc g++ python3 \
liburing-dev libhwloc-dev libopenblas-dev libxxhash-dev \
libcmocka-dev libjson-c-dev libssl-dev clang libclang-rt-14-dev gnuplot-nox"

missing=""
for p in $PACKAGES; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	case "$status" in
	"install ok installed") ;;
	*) missing="$missing $p" ;;
	esac
done
[ -z "$missing" ] && exit 0

cmd="apt-get install -y --no-install-recommends$missing"
if [ "$(id -u)" -ne 0 ]; then
	echo "libkv needs these Debian packages:$missing" >&2
	echo "run as root:  apt-get update && $cmd" >&2
	exit 1
fi
echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
