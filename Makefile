# libkv front door. `make demo` and `make test` install missing Debian
# packages first (scripts/deps.sh); plain `make` only builds build/.
PREFIX ?= /usr/local
BUILD := build

.PHONY: all deps demo test bench bench-all install clean

all: $(BUILD)/build.ninja
	@meson compile -C $(BUILD)

$(BUILD)/build.ninja:
	meson setup $(BUILD) --buildtype=release

deps:
	@scripts/deps.sh

# The demo: what libkv sees here, the embedding example, then kv-llama on
# the 15M synthetic model (written once to ~/.cache/libkv): a short prompt,
# then a batch of 4 prompts sharing a prefix (the later three hit the first
# one's KV blocks in the prefix cache).
demo: deps all
	./$(BUILD)/examples/kv-info
	@echo
	./$(BUILD)/examples/kv-embed
	@echo
	./$(BUILD)/examples/llama/kv-llama --synthetic 15M --prompt "Once upon a time" --steps 48
	@echo
	./$(BUILD)/examples/llama/kv-llama --synthetic 15M --prompts-file examples/llama/demo-prompts.txt --steps 48

test: deps
	@scripts/test.sh

# The sweep of tokens/s against DRAM footprint (kv-bench sweep): the 110M
# synthetic model over weights resident x batch x KV dtype, its report,
# CSV, JSON and gnuplot plots in bench/results/<date>-<host>/. Models are
# written once into kv-llama's cache directory (llm_cache_dir():
# $$KV_LLAMA_CACHE, ~/.cache/libkv, ...).
bench: deps all
	./$(BUILD)/bench/kv-bench sweep

# The other scenarios, each against its in-run reference. io keeps a 2 GiB
# data file in $(BUILD)/ between runs; decode writes its synthetic models
# (4.6 GB, the first time) into kv-llama's cache directory.
bench-all: all
	./$(BUILD)/bench/kv-bench registry
	./$(BUILD)/bench/kv-bench alloc
	./$(BUILD)/bench/kv-bench io --dir $(BUILD)
	./$(BUILD)/bench/kv-bench kv
	./$(BUILD)/bench/kv-bench decode

install: all
	meson configure $(BUILD) -Dprefix=$(PREFIX)
	meson install -C $(BUILD)

clean:
	rm -rf $(BUILD) build-asan build-tsan build-fuzz build-stage
