# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-train test test-quick venv clean

venv: $(STAMP)

# torch is installed first, pinned, so that no other package pulls an unpinned (CUDA) build.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: the tiny 16-variant ablation (+ the dense baseline) on a local Ray instance, then the
# report (ranked table, effects, Pareto plots) in runs/ablation-tiny. Re-running resumes it.
demo: $(STAMP)
	$(PY) -m tune.ablation --config configs/ablation/tiny.yaml

# One training job: the tiny config (every approximation, layer-wise growth, freezing, full-rank finish) as 2 DeepSpeed
# processes through the deepspeed launcher (on a CPU-only machine: 2 CPU ranks over gloo).
DEMO_CONFIG := configs/experiments/tiny.yaml
# A new run directory each time: an earlier demo's checkpoints and final model are never touched.
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo-train: $(STAMP)
	$(PY) -m distributed.summary --config $(DEMO_CONFIG)
	$(VENV)/bin/deepspeed --log_level warning --num_gpus 2 \
		--master_port $$($(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
		--module distributed.train --config $(DEMO_CONFIG) --run-dir $(DEMO_DIR)
	@echo "metrics:     $(DEMO_DIR)/metrics.jsonl (and $(DEMO_DIR)/config.yaml)"
	@echo "checkpoints: $(DEMO_DIR)/checkpoints (latest: $$(cat $(DEMO_DIR)/checkpoints/latest))"
	@echo "final model: $(DEMO_DIR)/final (nanoGPT safetensors; Hugging Face GPT-2 copy in final/hf)"
	@echo "sample:      $(PY) -m distributed.sample $(DEMO_DIR) --prompt 'def '"

test: $(STAMP)
	$(PY) -m pytest -q

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
