# Hearth: `make run` sets up this machine and starts hearthd; `make test` runs every test tier.
# Both work on a fresh Debian 12 machine as root (they install what is missing).

CARGO      ?= cargo
TARGET     := x86_64-unknown-linux-gnu
# The guest agent is linked statically so it runs on any guest libc.
AGENT      := target/$(TARGET)/release/hearth-guest
DATA_DIR   ?= /var/lib/hearth
export HEARTH_IMAGE_AGENT_PATH ?= $(abspath $(AGENT))

.PHONY: run deps build agent image install uninstall test lint bench clean-test

run: deps build agent image
	@echo "hearthd is starting on its defaults (API on http://127.0.0.1:7070, data in $(DATA_DIR))"
	@echo "in another terminal: export PATH=\$$PWD/target/release:\$$PATH; hearth health"
	HEARTH_DATA_DIR=$(DATA_DIR) target/release/hearthd

deps:
	@bash scripts/install-deps.sh

build:
	$(CARGO) build --release -p hearthd -p hearth -p hearth-helper

agent:
	RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" $(CARGO) build --release -p hearth-guest --target $(TARGET)

image: build agent
	HEARTH_DATA_DIR=$(DATA_DIR) target/release/hearthd build-image

# hearthd as a system service: binaries in $(PREFIX)/bin, the hearth user, /etc/hearth/hearth.toml
# (made once), /var/lib/hearth, the guest image, systemd units. DESTDIR=DIR stages the files only.
# `make uninstall` keeps the configuration, the VMs and the user unless PURGE=1.
install: deps build agent
	bash scripts/install.sh install

uninstall:
	bash scripts/install.sh uninstall

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit and component tests, then the real tests: hearthd in a network namespace of its own,
# real QEMU guests, the real CLI. The guest image is built once and cached in target/.
test: deps agent lint
	$(CARGO) build --workspace
	$(CARGO) test --workspace --all-targets --no-fail-fast

bench: deps agent
	$(CARGO) build --release -p hearthd -p hearth -p hearth-helper -p xtask
	target/release/xtask bench
