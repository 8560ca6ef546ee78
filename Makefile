# `make demo` and `make test` each start from a fresh virtualenv, as a new user would.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DIGITS := calibration/digits

.PHONY: venv demo test bench clean

venv:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: a looser spec lets pip fetch a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,dev]'

demo: venv
	$(PY) examples/digits/train.py --out $(DIGITS)
	$(VENV)/bin/trtglm build $(DIGITS)/digits_cnn.onnx --int8 --calib $(DIGITS)/calib --eval $(DIGITS)/eval \
		--out out/digits

test: venv
	$(PY) -m pytest tests

bench:
	bash bench/setup.sh
	.venv-bench/bin/python examples/digits/train.py --out $(DIGITS)
	.venv-bench/bin/python bench/calibration.py

.PHONY: bench-minilm
bench-minilm:
	bash bench/setup.sh
	.venv-bench/bin/python bench/minilm.py

.PHONY: bench-glm
bench-glm:
	bash bench/setup.sh
	.venv-bench/bin/python bench/glm.py

clean:
	rm -rf $(VENV) out $(DIGITS) .pytest_cache
