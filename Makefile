# Quickstart: `make demo` then `make test`. Both create .venv on first use and install everything
# the project needs from its own files (pyproject.toml + the steps below).
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
DEMO_OUT ?= demo_out

.PHONY: venv demo test test-all test-browser browser-deps lint proto clean gpu-bundle

venv: $(STAMP)

# The dev/CI pins first: torch==2.13.0 (the local CPU wheel here; pyproject only asks for torch>=2.4 so
# that GPU hosts keep their CUDA build) and triton==3.9.0 (its interpreter runs the Triton kernel tests on
# CPU; verified with torch 2.13). Then the package with every group demo and tests need, then mediapipe
# 0.10.21 with --no-deps (its metadata pulls jax and opencv-contrib we do not want; its runtime needs
# are the `preprocess` group).
$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0 triton==3.9.0
	$(VPY) -m pip install -q -e '.[preprocess,serve,web,dev,ray]' torch==2.13.0 triton==3.9.0
	$(VPY) -m pip install -q --no-deps mediapipe==0.10.21
	$(VPY) -c "import torch, mediapipe, nerfacc, av, librosa, grpc, aiohttp, aiortc, ray, shtab; print('environment ok: torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avatar demo --data $(DATA) --out $(DEMO_OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) -m pytest -q -m "not slow and not cuda" tests

# ruff (pyflakes, pycodestyle, complexity <= 15), ruff's formatter as a check (line length 120),
# mypy on avatar/ (lenient: pyproject [tool.mypy]) and the
# one-way import graph (tests/test_architecture.py); docs/ARCHITECTURE.md "Habits". .ci/run runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VPY) -m pytest -q -p no:cacheprovider tests/test_architecture.py

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) -m pytest -q tests

# The web console in a real browser (tests/test_web.py, marked slow): Debian's chromium (never a
# downloaded browser build) driven by Playwright's python package through /usr/bin/chromium.
browser-deps: $(STAMP)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium chromium-driver)
	$(VPY) -m pip install -q -e '.[browser]'

test-browser: browser-deps
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VPY) -m pytest -q -s -m slow tests/test_web.py

# A <= 60 MiB folder that checks the GPU path on a bare offline GPU host: `bash gpu_bundle/gpu_check.sh`
# there (code, a 12 s 512 px compact dataset of acosta, wheels a CUDA torch host lacks; bench/gpu_bundle.py).
gpu-bundle: $(STAMP)
	$(VPY) -m avatar_bench.gpu_bundle --out gpu_bundle --video $(DATA)/speakers/acosta_cnn_71s.mp4

# Regenerate the committed gRPC stubs (service/avatar_pb2*.py) from proto/avatar/v1/avatar.proto.
# The generated grpc module imports `avatar.v1.avatar_pb2`, which would clash with our `avatar`
# package: rewrite it to `avatar_service.avatar_pb2`.
proto: $(STAMP)
	rm -rf .proto_gen && mkdir -p .proto_gen
	$(VPY) -m grpc_tools.protoc -Iproto --python_out=.proto_gen --pyi_out=.proto_gen --grpc_python_out=.proto_gen proto/avatar/v1/avatar.proto
	mv .proto_gen/avatar/v1/avatar_pb2.py .proto_gen/avatar/v1/avatar_pb2.pyi .proto_gen/avatar/v1/avatar_pb2_grpc.py service/
	sed -i 's/^from avatar\.v1 import avatar_pb2/from avatar_service import avatar_pb2/' service/avatar_pb2_grpc.py
	rm -rf .proto_gen

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
