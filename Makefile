# libkv front door. `make demo` and `make test` install missing Debian
# packages first (scripts/deps.sh); plain `make` only builds build/.
PREFIX ?= /usr/local
BUILD := build

.PHONY: all deps demo test bench install clean

all: $(BUILD)/build.ninja
	@meson compile -C $(BUILD)

$(BUILD)/build.ninja:
	meson setup $(BUILD) --buildtype=release

deps:
	@scripts/deps.sh

demo: deps all
	./$(BUILD)/examples/kv-info
	@echo
	./$(BUILD)/examples/kv-embed

test: deps
	@scripts/test.sh

# io keeps a 2 GiB data file in $(BUILD)/ between runs.
bench: all
	./$(BUILD)/bench/kv-bench registry
	./$(BUILD)/bench/kv-bench alloc
	./$(BUILD)/bench/kv-bench io --dir $(BUILD)
	./$(BUILD)/bench/kv-bench kv

install: all
	meson configure $(BUILD) -Dprefix=$(PREFIX)
	meson install -C $(BUILD)

clean:
	rm -rf $(BUILD) build-asan build-tsan build-stage
