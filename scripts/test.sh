#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine with a Rust toolchain:
# installs what the tests need where it is missing, then checks the docs'
# links, formatting and lints, and runs every test.
#
#   bash scripts/test.sh                 # install what is missing, then test
#   INSTALL_ONLY=1 bash scripts/test.sh  # only the install part
#
# What it installs (Debian packages, with sudo when not root):
#   - rustfmt and clippy (rustup components), for `cargo fmt` and `cargo clippy`;
#   - nginx, libnginx-mod-stream and haproxy: the front tests
#     (server/tests/front.rs) run real ones on loopback;
#   - nats-server: the --nats tests (server/tests/nats.rs) start a real one.
# Only these binaries are used; their system services are not started
# (policy-rc.d answers 101 to the packages' postinst while root installs).
# Without the packages the front and NATS tests fail saying which to
# install, unless C1M_SKIP_FRONT=1 / C1M_SKIP_NATS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo is missing; this project needs a Rust toolchain (rustup) on the machine" >&2
  exit 1
fi

# fmt and clippy are rustup components; add them where the toolchain lacks them.
for tool in rustfmt clippy; do
  if ! cargo "${tool/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$tool"
  fi
done

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
updated=""
apt_install() { # packages...
  if [ -z "$updated" ]; then
    # policy-rc.d 101: the packages' postinst must not start the services.
    if [ -z "$sudo" ] && [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $sudo apt-get update -qq || true
    updated=1
  fi
  $sudo apt-get install -y -qq "$@"
}

# The front tests: HAProxy, and nginx with its stream module.
if ! have haproxy || ! have nginx || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  apt_install nginx libnginx-mod-stream haproxy
fi

# The --nats tests: a real nats-server (they fail saying so without it).
if ! have nats-server; then
  apt_install nats-server || echo "test.sh: could not install nats-server; the NATS tests will say so" >&2
fi

if [ -n "${INSTALL_ONLY:-}" ]; then
  echo "test.sh: installed what the tests need (INSTALL_ONLY: no tests run)"
  exit 0
fi

bash scripts/check-links.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --release
