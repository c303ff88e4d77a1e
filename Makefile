# make demo: install, build a throwaway namespace lab, balance real traffic, clean up.
# make test: install, then ruff and mypy over nftlb/, then the whole suite (unit tests and kernel tests
#   in namespaces; needs root).
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nftables python3-nftables iproute2 conntrack python3-venv
export DEBIAN_FRONTEND := noninteractive

.PHONY: install deps check test unit demo bench clean

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing" $$missing; \
	  apt-get install -y -q $$missing || { apt-get update -q && apt-get install -y -q $$missing; }; \
	fi

# The venv sees Debian's python3-nftables through --system-site-packages.
$(VENV)/.installed: pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: deps $(VENV)/.installed

# The house's guards first (lint, format, types), then the suite.
check: install
	$(PY) -m ruff check nftlb
	$(PY) -m ruff format --check nftlb
	$(PY) -m mypy

test: check
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests

demo: install
	$(PY) integration/demo.py

# Benchmarks (not part of `make test`): see bench/README.md. Several minutes; a quiet machine.
bench: install
	apt-get install -y -q --no-install-recommends wrk nginx-light haproxy iptables
	$(PY) bench/hashing.py
	$(PY) bench/controlplane.py --pools 10000 --rounds 3
	$(PY) bench/dataplane.py --seconds 5 --rounds 3 --pools 10000
	$(PY) bench/probes.py --backends 200 --rounds 15

clean:
	rm -rf $(VENV) build dist *.egg-info
