# crio-py: `make run` runs all five services, `make test` runs the tests.
# Both install what is missing first (Debian packages as root, then a virtualenv).

SHELL := /bin/bash
VENV ?= .venv
# The frontend and imaged run as users of their own and must read the interpreter's standard
# library: the virtualenv is made from Debian's python3, which every user may read.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
PY := $(VENV)/bin/python
CRIOPY := $(VENV)/bin/criopy
CNI_CONF_DIR ?= /etc/cni/net.d

# Real parts: the OCI runtime, the container monitor, CNI plugins, busybox for
# test images, a registry, the tools netd and runtimed call, and the pause-like
# init of pods that share a PID namespace; skopeo is the pull benchmark's yardstick; criu checkpoints containers;
# prometheus (with promtool) scrapes and checks the metrics endpoint in the tests;
# passwd (groupadd, useradd) makes the services' accounts; systemd gives systemd-analyze, which checks the units.
DEBIAN_PACKAGES := runc conmon containernetworking-plugins busybox-static docker-registry \
	iproute2 iptables mount util-linux hostname catatonit libcap2-bin kmod python3-venv skopeo criu prometheus \
	passwd systemd

# Real Kubernetes clients for `make test-clients` (not part of `make test`); `make bench` uses crictl too.
CRICTL ?= ../shared/tools/crictl
KUBELET ?= ../shared/tools/kubelet

.PHONY: all setup debian-packages venv venv-readable cni-config run test test-clients bench clean

all: setup

setup: debian-packages venv

debian-packages:
	@missing=""; \
	for pkg in $(DEBIAN_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: venv-readable $(VENV)/.installed

# A virtualenv made from a Python only root may read (one under /root) is made again.
venv-readable:
	@home=$$(sed -n 's/^home = //p' $(VENV)/pyvenv.cfg 2>/dev/null); \
	if [ -n "$$home" ] && ! setpriv --reuid=65534 --regid=65534 --clear-groups test -r "$$home" -a -x "$$home"; then \
		echo "$(VENV) uses a Python other users cannot read: making it again from $(PYTHON)"; \
		rm -rf $(VENV); \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,otlp]'
	touch $@

# The default CNI network, unless the machine already has one.
cni-config:
	@if ! ls $(CNI_CONF_DIR)/*.conf $(CNI_CONF_DIR)/*.conflist $(CNI_CONF_DIR)/*.json >/dev/null 2>&1; then \
		install -D -m 0644 deploy/cni/10-criopy-bridge.conflist $(CNI_CONF_DIR)/10-criopy-bridge.conflist; \
		echo "installed the default CNI network in $(CNI_CONF_DIR)"; \
	fi

run: setup cni-config
	exec $(CRIOPY) run

test: setup
	$(PY) -m pytest -q tests --ignore=tests/clients

# crio-py checked with crictl and a standalone kubelet; needs root and both binaries.
test-clients: setup
	@for binary in "$(CRICTL)" "$(KUBELET)"; do \
		if [ ! -x "$$binary" ]; then \
			echo "test-clients: $$binary is missing or not executable; set CRICTL=... and KUBELET=... to the crictl and kubelet binaries" >&2; \
			exit 2; \
		fi; \
	done
	CRICTL="$(abspath $(CRICTL))" KUBELET="$(abspath $(KUBELET))" $(PY) -m pytest -q tests/clients

# The streaming benchmark drives crio-py with crictl (CRICTL, as for test-clients).
bench: setup
	CRICTL="$(abspath $(CRICTL))" $(PY) -m tests.bench

clean:
	rm -rf $(VENV) *.egg-info
