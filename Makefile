# The two commands of the README. Each creates .venv itself and installs what it needs.
#   make demo   run the product on the generated sample slide
#   make test   run the whole test suite (GUI tests under Xvfb)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Debian packages napari's Qt (xcb platform) needs on a bare machine, and the virtual display.
GUI_DEBS := xvfb xauth libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon0 \
            libxkbcommon-x11-0 libxcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
            libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 \
            libxcb-xkb1 libx11-xcb1

.PHONY: demo test venv gui-deps lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-cache-dir -e ".[all,dev]"
	touch $(STAMP)

gui-deps:
	@missing=""; for p in $(GUI_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the GUI:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: venv gui-deps
	QT_QPA_PLATFORM=xcb $(PY) -m pytest

demo: venv gui-deps
	$(PY) -m histocluster_napari.demo

lint: venv
	$(VENV)/bin/ruff check engine histocluster_napari tests benchmarks sample_data

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
