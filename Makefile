# emotiond — the two commands:
#   make run    set up (system packages, ONNX Runtime), build, run the daemon on the bundled sample video with
#               the embedded broker, and print what it publishes (Ctrl-C stops both)
#   make test   set up, then run the whole test suite
SHELL := /bin/bash
CARGO ?= $(shell command -v cargo 2>/dev/null || echo $(HOME)/.cargo/bin/cargo)

.PHONY: run test deps build validate bench clean

deps:
	deploy/install-deps.sh

build: deps
	$(CARGO) build --release --locked

run: build
	deploy/demo.sh target/release/emotiond

test: deps
	$(CARGO) test --locked -- --test-threads=2

validate: build
	target/release/emotiond validate $(if $(CONFIG),--config $(CONFIG),)

bench: build
	target/release/emotiond bench

clean:
	$(CARGO) clean
