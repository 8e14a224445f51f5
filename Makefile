# One entry point for people and CI. `make test` and `make demo` set themselves up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup test demo bench lint clean-assets

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml or the setup script changed.
$(STAMP): pyproject.toml tools/setup_env.sh
	PYTHON=$(PYTHON) bash tools/setup_env.sh $(VENV)
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python -m pipeline.toy.demo

# A bench exits 1 when a goal it checks is missed; `-` lets the others run anyway.
bench: setup
	-$(BIN)/python bench/codec.py
	-$(BIN)/python bench/codec.py --profile quality
	-$(BIN)/python bench/loader.py
	-$(BIN)/python bench/gen_throughput.py
	-$(BIN)/python bench/train_step.py
	for profile in quality demo; do for scale in 1 1.5; do for seed in 0 1; do \
		$(BIN)/python bench/quality.py --profile $$profile --teacher-scale $$scale --seed $$seed --kd-ratio 0.5 || true; \
	done; done; done
	-$(BIN)/python -m pip install -q 'matplotlib>=3.8' && $(BIN)/python bench/quality_chart.py
	for profile in demo quality; do for seed in 0 1; do \
		$(BIN)/python bench/cross_tokenizer.py --profile $$profile --seed $$seed || true; \
	done; done
	for seed in 0 1; do $(BIN)/python bench/cross_tokenizer.py --matched-start --seed $$seed || true; done

lint: setup
	$(BIN)/ruff check .

clean-assets:
	rm -rf .assets
