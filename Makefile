# emotiond — the two commands:
#   make run    set up (system packages, ONNX Runtime), build, run the daemon on the bundled sample video with
#               the embedded broker, and print what it publishes (Ctrl-C stops both)
#   make test   set up, then run the whole test suite
SHELL := /bin/bash
CARGO ?= $(shell command -v cargo 2>/dev/null || echo $(HOME)/.cargo/bin/cargo)

.PHONY: run test deps build lint validate bench clean model

deps:
	deploy/install-deps.sh

build: deps
	$(CARGO) build --release --locked

run: build
	deploy/demo.sh target/release/emotiond

test: deps
	deploy/install-test-tools.sh
	PATH="$(CURDIR)/.cache/test-tools/bin:$$PATH" $(CARGO) test --locked -- --test-threads=2
	$(CARGO) test --locked --features gpu --test gpu_train -- --test-threads=2

# Formatting and clippy, warnings as errors (needs the rustfmt and clippy components).
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) clippy --locked --all-targets --features gpu -- -D warnings

validate: build
	target/release/emotiond validate $(if $(CONFIG),--config $(CONFIG),)

bench: build
	target/release/emotiond bench

clean:
	$(CARGO) clean

# The shipped emotion models, reproduced end to end (models/README.md; five stages and a weight average, about 10 h on 2 cores, resumable):
#   make model FER2013=/path/to/fer2013.tar.gz     (Kaggle layout: train/<class>/, test/<class>/ = PublicTest)
#   make model FER2013=... DEVICE=gpu              (trains on a GPU through Vulkan: a build with --features gpu)
FER2013 ?= data/fer2013.tar.gz
MODEL_RUN ?= runs/fer2013-lite0-focal-64
DEVICE ?= cpu
model: deps
	$(CARGO) build --release --locked $(if $(filter gpu,$(DEVICE)),--features gpu,)
	EMOTIOND_DEVICE=$(DEVICE) deploy/train-model.sh target/release/emotiond "$(FER2013)" "$(MODEL_RUN)"

# Debian package of a release build: target/debian/emotiond_<version>-1_<arch>.deb (docs/deploy.md).
.PHONY: deb
deb: deps
	command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install cargo-deb --version 3.8.0 --locked
	$(CARGO) deb --locked
