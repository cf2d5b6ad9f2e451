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

bench: all
	./$(BUILD)/bench/kv-bench registry

install: all
	meson configure $(BUILD) -Dprefix=$(PREFIX)
	meson install -C $(BUILD)

clean:
	rm -rf $(BUILD) build-asan build-tsan build-stage
