# apppot — `make demo` runs the main job on the embedded default image; `make test` runs every test.
# Both install what they need first (Debian packages as root, a virtualenv in .venv).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
# install: where an admin puts apppot on a node, and the Python that runs it there (stdlib + classad2)
PREFIX    ?= /usr/local
DESTDIR   ?=
PYTHON    ?= /usr/bin/python3
CONDOR_CONFIG_DIR ?= /etc/condor/config.d
IMAGE_DIR ?= /var/lib/apppot/images
# the node's image cache (55-apppot-cache.conf); apppot_fetchd creates it as the condor account
CACHE_DIR ?= /var/lib/apppot/cache
# caches that survive `git clean`: built kernel and test images
APPPOT_CACHE ?= /var/cache/apppot
export APPPOT_CACHE

# What a pristine Debian 12 (debootstrap minbase + python3-venv, make, git) lacks. nginx-light: the HTTP
# server the condor tests fetch images from (tests/condor/conftest.py http_server). gcc + libc6-dev:
# pip builds libvirt-python from source. kernel/build-uml-kernel installs its own build tools.
APT_PACKAGES := python3-dev python3-venv gcc libc6-dev libvirt-dev pkg-config \
	qemu-utils qemu-system-x86 user-mode-linux busybox-static debootstrap e2fsprogs \
	libvirt-daemon-system libvirt-clients shellcheck hyperfine uml-utilities strace nginx-light
KERNEL := $(APPPOT_CACHE)/linux-uml

# The condor tier runs against two HTCondor series (docs/condor.md, "Supported versions"): a personal
# pool of Debian trixie (23.9.x) with the 23.10 bindings in .venv, and one of Debian sid (25.x,
# CONDOR_SUITE=sid) with the 25.x bindings in $(VENV25). The tests use only htcondor2/classad2, which
# both wheels have (the 25.x wheel has nothing else).
HTCONDOR23 ?= htcondor==23.10.29
HTCONDOR25 ?= htcondor==25.14.1
VENV25    ?= .venv.25
CONDOR25_SUITE ?= sid

.PHONY: help deps venv venv25 uml-kernel demo test test-unit test-condor test-condor-25 install uninstall bench bench-condor-25 clean

help:
	@echo "make demo    run one AppPot job through the apppot:// plugin on the tiny image"
	@echo "make test    install everything needed, then run every test (unit, VM boots, HTCondor 23.x),"
	@echo "             then the HTCondor tier again against HTCondor 25.x (make test-condor-25)"
	@echo "make test-condor / test-condor-25   only the HTCondor tier, on the 23.x / 25.x personal pool"
	@echo "make install put apppot on an HTCondor execute node (PREFIX=$(PREFIX) DESTDIR=$(DESTDIR))"
	@echo "make uml-kernel  build apppot's fast UML kernel (~4 min, cached)"
	@echo "make bench   run the benchmarks in bench/ after make test (results: docs/performance.md)"

# Debian packages: installed only if one is missing (needs root then).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install: $$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.stamp: setup.cfg pyproject.toml
	/usr/bin/python3 -m venv $(VENV)  # the system Python: unprivileged test users can run it (pyenv lives under /root)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' '$(HTCONDOR23)'
	touch $@

venv: deps $(VENV)/.stamp

$(VENV25)/.stamp: setup.cfg pyproject.toml
	/usr/bin/python3 -m venv $(VENV25)
	$(VENV25)/bin/python -m pip install -q --upgrade pip
	$(VENV25)/bin/python -m pip install -q -e '.[test]' '$(HTCONDOR25)'
	touch $@

venv25: deps $(VENV25)/.stamp

$(KERNEL): kernel/build-uml-kernel kernel/uml.config $(wildcard kernel/patches/*.patch)
	bash kernel/build-uml-kernel $@

uml-kernel: $(KERNEL)
	install -D -m 0755 $(KERNEL) $(DESTDIR)$(PREFIX)/lib/apppot/linux

demo: venv uml-kernel
	$(PY) scripts/demo.py

# The personal pools share ports: the 23.x tier brings its pool down before the 25.x one comes up
# (unless it was up before; then test-condor-25 stops with "another personal pool is up").
test: venv venv25 uml-kernel
	$(PY) -m pytest -m "" tests
	$(MAKE) test-condor-25

test-condor: venv uml-kernel
	$(PY) -m pytest -m "" tests/condor

test-condor-25: venv venv25 uml-kernel
	CONDOR_SUITE=$(CONDOR25_SUITE) $(VENV25)/bin/python -m pytest -m "" tests/condor

test-unit: venv
	$(PY) -m pytest -m "not vm and not condor and not soak" tests

# Uses the images `make test` caches (run it first); boot/io print tables for docs/performance.md,
# snap and condor rewrite their own sections of it.
TEST_IMAGES = $(APPPOT_CACHE)/test-images
bench: venv uml-kernel
	$(PY) bench/staging.py
	$(PY) bench/boot.py --tiny $$(ls -t $(TEST_IMAGES)/tiny-*.img | head -1) --debian $$(ls -t $(TEST_IMAGES)/debian-*.img | head -1)
	$(PY) bench/boot.py --launch --tiny $$(ls -t $(TEST_IMAGES)/tiny-*.img | head -1) -n 15
	$(PY) bench/io.py --image $$(ls -t $(TEST_IMAGES)/debian-*.img | head -1)
	$(PY) bench/snap.py
	$(PY) bench/condor.py
	$(MAKE) bench-condor-25

bench-condor-25: venv25
	CONDOR_SUITE=$(CONDOR25_SUITE) $(VENV25)/bin/python bench/condor.py

# What an admin runs on an execute node. The package goes into PREFIX/lib/apppot (no pip needed on
# the node); commands are small wrappers run by $(PYTHON). The drop-ins advertise PREFIX's paths in the
# slot ad (APPPOT_LAUNCHER, APPPOT_VM_POST), which the submit templates use: they need no rewriting.
install:
	install -d $(DESTDIR)$(PREFIX)/lib/apppot $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/libexec/apppot \
		$(DESTDIR)$(PREFIX)/share/apppot/submit_templates $(DESTDIR)$(CONDOR_CONFIG_DIR) $(DESTDIR)$(IMAGE_DIR)
	rm -rf $(DESTDIR)$(PREFIX)/lib/apppot/apppot
	tar -c --exclude=__pycache__ apppot | tar -x -C $(DESTDIR)$(PREFIX)/lib/apppot
	@# byte-compiled now: the plugin runs as job users, who cannot write __pycache__ here and would
	@# otherwise compile its modules on every job. With DESTDIR the target's Python (or its package
	@# tooling) has to do it: `$(PYTHON) -m compileall $(PREFIX)/lib/apppot` there.
	if [ -z "$(DESTDIR)" ]; then $(PYTHON) -m compileall -q $(PREFIX)/lib/apppot; fi
	for cmd in apppot:main apppot-start:start_main; do \
	  printf '#!%s -I\nimport sys\nsys.path.insert(0, "%s")\nfrom apppot.cli import %s\nsys.exit(%s())\n' \
	    "$(PYTHON)" "$(PREFIX)/lib/apppot" "$${cmd#*:}" "$${cmd#*:}" > $(DESTDIR)$(PREFIX)/bin/$${cmd%%:*}; \
	  chmod 0755 $(DESTDIR)$(PREFIX)/bin/$${cmd%%:*}; \
	done
	for f in plugins/*; do \
	  sed '1s|.*|#!$(PYTHON) -I|' $$f > $(DESTDIR)$(PREFIX)/libexec/apppot/$$(basename $$f); \
	  chmod 0755 $(DESTDIR)$(PREFIX)/libexec/apppot/$$(basename $$f); \
	done
	for f in condor_config.d/*.conf; do \
	  sed -e '/^#/!s|/usr/local/|$(PREFIX)/|g' -e 's|/var/lib/apppot/images|$(IMAGE_DIR)|g' \
	    -e 's|^APPPOT_CACHE_DIR = .*|APPPOT_CACHE_DIR = $(CACHE_DIR)|' $$f \
	    > $(DESTDIR)$(CONDOR_CONFIG_DIR)/$$(basename $$f); \
	done
	install -m 0644 submit_templates/*.sub $(DESTDIR)$(PREFIX)/share/apppot/submit_templates/
	if [ -x $(KERNEL) ]; then install -m 0755 $(KERNEL) $(DESTDIR)$(PREFIX)/lib/apppot/linux; fi

uninstall:
	rm -rf $(DESTDIR)$(PREFIX)/lib/apppot $(DESTDIR)$(PREFIX)/libexec/apppot $(DESTDIR)$(PREFIX)/share/apppot \
		$(DESTDIR)$(PREFIX)/bin/apppot $(DESTDIR)$(PREFIX)/bin/apppot-start
	for f in condor_config.d/*.conf; do rm -f $(DESTDIR)$(CONDOR_CONFIG_DIR)/$$(basename $$f); done

clean:
	rm -rf $(VENV) build .pytest_cache
