#!/usr/bin/env bash
# `make test`: the whole suite in a release build and in an
# address+undefined sanitizer build, the concurrency suite under the thread
# sanitizer, all with warnings as errors; 60 s of libFuzzer on kv-llama's
# file readers (skipped without clang); then an install into a staging
# prefix and the README's embedding example compiled against it through
# pkg-config, as C and as C++. Ends with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0 failed=0 skipped=0

# Configure a build dir, or reconfigure it with the same options, so that
# repeated runs reuse what is built.
setup() {
	local dir=$1
	shift
	if [ -f "$dir/build.ninja" ]; then
		meson configure "$dir" "$@" >/dev/null
	else
		meson setup "$dir" "$@" >/dev/null
	fi
}

# Run meson test in a build dir and add its results to the tally.
run_suite() {
	local dir=$1 label=$2
	shift 2
	echo "== $label"
	local rc=0
	# meson names the log after a --wrapper too: clear them all, read
	# whichever this run wrote.
	rm -f "$dir"/meson-logs/testlog*.json
	meson test -C "$dir" --print-errorlogs "$@" || rc=$?
	read -r p f s < <(python3 - "$dir"/meson-logs/testlog*.json <<'PY'
import json, sys
p = f = s = 0
for line in open(sys.argv[1]):
    r = json.loads(line).get("result")
    if r in ("OK", "EXPECTEDFAIL"):
        p += 1
    elif r == "SKIP":
        s += 1
    else:
        f += 1
print(p, f, s)
PY
	)
	passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
	[ "$rc" -eq 0 ] || echo "!! $label: meson test failed (exit $rc)"
}

common=(-Dwerror=true -Dtests=enabled)

echo "== build: release"
setup build --buildtype=release "${common[@]}"
meson compile -C build >/dev/null
run_suite build "tests: release" --num-processes 2

echo "== build: address+undefined sanitizers"
setup build-asan --buildtype=debugoptimized -Db_sanitize=address,undefined \
	-Db_lundef=false "${common[@]}" -Dc_args=-fno-sanitize-recover=all
meson compile -C build-asan >/dev/null
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	run_suite build-asan "tests: address+undefined" --num-processes 2 --timeout-multiplier 3

echo "== build: thread sanitizer"
setup build-tsan --buildtype=debugoptimized -Db_sanitize=thread -Db_lundef=false "${common[@]}"
meson compile -C build-tsan >/dev/null
# Without ASLR: older TSan runtimes reject some kernels' mmap layouts.
TSAN_OPTIONS=halt_on_error=1 run_suite build-tsan "tests: thread sanitizer (concurrency suite)" \
	--suite concurrency --timeout-multiplier 4 --wrapper "setarch $(uname -m) -R"

# The kv-llama readers' libFuzzer harness for 60 s in a clang build of
# its own (the other harnesses in tests/fuzz stay out: see its README).
# Seeds are written into the corpus, which build-fuzz keeps between runs.
echo "== fuzz: kv-llama readers (libFuzzer, 60 s)"
fuzz_skip=""
if ! command -v clang >/dev/null; then
	fuzz_skip="clang not found (scripts/deps.sh installs it)"
else
	probe=$(mktemp -d)
	echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }' >"$probe/p.c"
	clang -fsanitize=fuzzer -o "$probe/p" "$probe/p.c" 2>/dev/null ||
		fuzz_skip="clang cannot link -fsanitize=fuzzer (libFuzzer is in libclang-rt-14-dev)"
	rm -rf "$probe"
fi
if [ -n "$fuzz_skip" ]; then
	echo "SKIP: $fuzz_skip"
	skipped=$((skipped + 1))
else
	# Coverage and UBSan instrumentation keep clang from vectorising the
	# kernels' `omp simd` loops, which it reports as a warning
	# (-Wpass-failed); that is no defect of the code, so it is not an error.
	CC=clang setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false \
		-Dtests=disabled -Dwerror=true -Dc_args=-Wno-pass-failed
	meson compile -C build-fuzz fuzz_llama_readers >/dev/null
	mkdir -p build-fuzz/corpus-llama
	if KV_FUZZ_SEED_DIR=build-fuzz/corpus-llama UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		build-fuzz/tests/fuzz/fuzz_llama_readers -max_total_time=60 -max_len=8192 \
		-artifact_prefix=build-fuzz/ build-fuzz/corpus-llama >build-fuzz/fuzz-llama.log 2>&1; then
		echo "fuzz_llama_readers: $(grep -o 'Done [0-9]* runs in [0-9]* second' build-fuzz/fuzz-llama.log), no finding"
		passed=$((passed + 1))
	else
		tail -n 40 build-fuzz/fuzz-llama.log
		echo "!! fuzz_llama_readers failed: build-fuzz/fuzz-llama.log, inputs in build-fuzz/crash-*"
		failed=$((failed + 1))
	fi
fi

echo "== install and embed"
stage=$PWD/build-stage
rm -rf "$stage"
meson install -C build --destdir "$stage" >/dev/null
pc=$(find "$stage" -name libkv.pc | head -n 1)
libdir=$(dirname "$(dirname "$pc")")
export PKG_CONFIG_PATH=$(dirname "$pc") PKG_CONFIG_SYSROOT_DIR=$stage
embed_ok=1
# The README's example must be examples/embed.c, byte for byte.
if ! diff -u examples/embed.c <(sed -n '/<!-- embed:begin -->/,/<!-- embed:end -->/p' README.md |
	sed '1,2d;$d' | sed '$d'); then
	echo "!! README.md's embedding example differs from examples/embed.c"
	embed_ok=0
fi
for lang in c c++; do
	compiler=cc
	[ "$lang" = c++ ] && compiler=c++
	# shellcheck disable=SC2046
	if $compiler -x "$lang" -Wall -Wextra -Werror -o "$stage/embed-$lang" examples/embed.c \
		$(pkg-config --cflags --libs libkv) &&
		LD_LIBRARY_PATH=$libdir "$stage/embed-$lang" >"$stage/embed-$lang.out" &&
		grep -q "seq0.kv" "$stage/embed-$lang.out"; then
		echo "embed ($lang): ok"
	else
		echo "!! embed ($lang) failed"
		embed_ok=0
	fi
done
if [ "$embed_ok" -eq 1 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

echo
echo "total: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
