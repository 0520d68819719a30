# Two commands set everything up on a fresh machine:
#   make demo   -> local virtualenv + the main job (cut resnet50 after layer2)
#   make test   -> local virtualenv + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv bench clean

$(BIN)/surgery: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir -e '.[dev]'
	touch $(BIN)/surgery

venv: $(BIN)/surgery

demo: venv
	$(BIN)/surgery cut resnet50 --at layer2 --out demo-output/resnet50-cut --force

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

bench: venv
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/surgery_zoo.py --onnx
	$(BIN)/python bench/growth_zoo.py --timm
	$(BIN)/python bench/transformers_zoo.py
	$(BIN)/python bench/depgraph_agreement.py
	$(BIN)/python bench/xross_cost.py

clean:
	rm -rf $(VENV) demo-output
