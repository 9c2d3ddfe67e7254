# Switchyard's tasks. `make run` serves; `make test` sets up what the tests
# need (wasm target, plugins, the Python client, the model file) and runs
# every test.

CARGO ?= cargo
# Empty: the embedded default (the small model in-process, no policy).
CONFIG ?=
VENV := .venv
NVRTC_VENV := .venv-nvrtc
# Plugins build as 0.3.0 components (wasm32-wasip2) and as 0.4.0 core
# modules (wasm32-unknown-unknown); Switchyard loads either.
WASM_TARGETS := wasm32-wasip2 wasm32-unknown-unknown
CARGO_DENY_VERSION := 0.20.2
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_TARGETS := api_request batch_split sse_events
# Seconds each fuzz target runs in `make fuzz`.
FUZZ_SECONDS ?= 60
PLUGINS := cost-router test-faults confidence-cascade concise tiered
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_VENV := .venv-llama
# llama.cpp's native build enables CPU features these machines do not allow
# and crashes; name the ones to use instead, AVX-512 only where the CPU
# has it.
LLAMA_AVX512 := $(if $(shell grep -m1 -ow avx512f /proc/cpuinfo 2>/dev/null),ON,OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=$(LLAMA_AVX512)

.PHONY: run build plugins setup wasm-target python nvrtc model test lint deny \
	audit deny-tool fuzz fuzz-tool bench iptables \
	bench-coalescing bench-policy-instructions bench-llama-venv clean

## run: serve the small model in-process on 127.0.0.1:8080, or
## $(CONFIG) when given (make run CONFIG=examples/switchyard.toml)
run: build model $(if $(CONFIG),plugins)
	./target/release/switchyard run $(if $(CONFIG),--config $(CONFIG))

build:
	$(CARGO) build --release -p switchyard

## plugins: every plugin in plugins/ built to target/wasm32-wasip2/release/
## (components) and target/wasm32-unknown-unknown/release/ (core modules)
plugins: wasm-target
	$(CARGO) build --release $(addprefix --target ,$(WASM_TARGETS)) \
		$(addprefix -p ,$(PLUGINS))

wasm-target:
	@for t in $(WASM_TARGETS); do \
		rustup target list --installed | grep -qx $$t \
			|| rustup target add $$t || exit 1; \
	done

## setup: everything the tests need besides the Rust toolchain
setup: wasm-target python nvrtc model iptables

## iptables: the `iptables` binary, which the transparent-capture test runs
## inside a network namespace of its own; installed with apt-get only when
## missing and running as root (the test says why it skips otherwise)
iptables:
	@if command -v iptables >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "iptables is missing and this is not root;" \
			"the transparent-capture test will be skipped"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing iptables: apt-get install -y iptables"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables \
			|| { apt-get update -q && \
				DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables; }; \
	else \
		echo "iptables is missing and there is no apt-get; install it" \
			"to run the transparent-capture test"; \
	fi

python: $(VENV)/.installed

$(VENV)/.installed: tests/python/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		-r tests/python/requirements.txt
	touch $@

## nvrtc: NVIDIA's run-time CUDA compiler (no GPU needed) in its own
## venv, so that the tests compile the executor's CUDA kernels
nvrtc: $(NVRTC_VENV)/.installed

$(NVRTC_VENV)/.installed: proxy/executor/tests/nvrtc-requirements.txt
	python3 -m venv $(NVRTC_VENV)
	$(NVRTC_VENV)/bin/pip install --quiet --disable-pip-version-check \
		-r proxy/executor/tests/nvrtc-requirements.txt
	touch $@

# Where that venv keeps libnvrtc.so.12, for the loader.
NVRTC_LIB = $(shell ls -d $(CURDIR)/$(NVRTC_VENV)/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib 2>/dev/null)

## model: SmolLM2-135M-Instruct at $(MODEL), checksums verified; the script
## keeps a file whose checksum matches
model: $(MODEL)

$(MODEL): scripts/fetch-model.sh
	scripts/fetch-model.sh

## test: lints, unit and integration tests, the Python client test; as
## root, the transparent-capture test must run too (it needs a network
## namespace)
test: setup plugins lint deny
	SWITCHYARD_REQUIRE_PYTHON=1 SWITCHYARD_REQUIRE_MODEL=1 \
		SWITCHYARD_REQUIRE_NVRTC=1 \
		LD_LIBRARY_PATH=$(NVRTC_LIB)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} \
		$(if $(filter 0,$(shell id -u)),SWITCHYARD_REQUIRE_NETNS=1) \
		$(CARGO) test --workspace

## deny: the dependency tree's licenses, duplicate versions and sources
## (deny.toml)
deny: deny-tool
	$(CARGO) deny check licenses bans sources

## audit: `deny` and the RustSec advisories, whose database is fetched
## from github.com
audit: deny-tool
	$(CARGO) deny check

deny-tool:
	@$(CARGO) deny --version 2>/dev/null | grep -qx "cargo-deny $(CARGO_DENY_VERSION)" \
		|| $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION)

lint:
	@for c in clippy rustfmt; do \
		rustup component list --installed | grep -q "^$$c" \
			|| rustup component add $$c; \
	done
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fuzz: each target in fuzz/ for FUZZ_SECONDS (default 60) with
## cargo-fuzz on nightly Rust; a finding stops it and lands in
## fuzz/artifacts/. Copy a finding into fuzz/seeds/<target>/ once fixed:
## `make test` replays every seed.
fuzz: fuzz-tool
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
		$(CARGO) +nightly fuzz run $$t fuzz/corpus/$$t fuzz/seeds/$$t \
			-- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

fuzz-tool:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly
	@$(CARGO) fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $(CARGO_FUZZ_VERSION)" \
		|| $(CARGO) install cargo-fuzz --locked --version $(CARGO_FUZZ_VERSION)

## bench: requests/s and latency, direct vs through Switchyard; the
## coalescing table; then the executor's decode tokens/s against llama.cpp's
bench: plugins model bench-llama-venv
	$(CARGO) bench -p switchyard --bench throughput
	$(CARGO) bench -p switchyard --bench coalescing
	python3 tests/bench/decode_compare.py

## bench-policy-instructions: instructions per request (callgrind) without
## a policy and with cost_router built against each interface version
bench-policy-instructions: plugins
	$(CARGO) build --release -p switchyard
	python3 tests/bench/policy_instructions.py --shape tiny
	python3 tests/bench/policy_instructions.py --shape typical

## bench-coalescing: no coalescing vs fixed vs adaptive window under
## open-loop load (BENCH_SECONDS per row, default 10)
bench-coalescing:
	$(CARGO) bench -p switchyard --bench coalescing

## bench-llama-venv: llama-cpp-python in $(LLAMA_VENV), the baseline for
## tests/bench/llama_cpp_decode.py (a 10-minute build on 2 cores, done once)
bench-llama-venv: $(LLAMA_VENV)/.installed

$(LLAMA_VENV)/.installed:
	python3 -m venv $(LLAMA_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLAMA_VENV)/bin/pip install \
		'llama-cpp-python==0.3.36' numpy
	touch $@

clean:
	$(CARGO) clean
	rm -rf $(VENV)
