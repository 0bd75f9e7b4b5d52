# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU torch lies on local disk where this machine kind keeps it; harmless elsewhere.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: demo test venv clean gpu-check smollm2

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# CPU torch first, so nothing later can pull a CUDA build of it.
	$(VPY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(VPY) -m pip install -q $(FIND_LINKS) -e '.[cpu,test]'
	# pip drags in CUDA builds of these through vllm; they break imports next to CPU torch.
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VPY) -c "import torch, megatron.core, vllm; assert not torch.version.cuda, torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m megatron_hapo.cli demo

# Two files at a time (tests/conftest.py orders the slow ones first); TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# A real pretrained model on this CPU: SmolLM2-135M-Instruct from its GGUF to curves (~30 min, examples/smollm2-135m).
smollm2: $(STAMP)
	$(VPY) examples/smollm2-135m/recipe.py --out runs/smollm2-135m --algorithms hapo

# On a GPU node, inside the image (its Python, not .venv): the one-script GPU self-test.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) tools/gpu_selftest.py --out gpu_selftest.json --table gpu_selftest.txt

clean:
	rm -rf $(VENV)
