# README's two commands: `make train` and `make test`. Both create .venv if missing and install
# megads with its dependencies (the CPU build of torch where there is no CUDA).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.megads-installed
TORCH_CPU ?= torch==2.13.0
NPROC   ?= 2
TEST_WORKERS ?= 2

.PHONY: install train test bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) setup.py setup_ext.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from the default index"; $(PY) -m pip install -q "torch>=2.4"; \
	else \
		echo "no CUDA: installing the CPU build ($(TORCH_CPU))"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[test,mpi]" --no-build-isolation
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/megads launch configs/tiny.yaml --nproc $(NPROC)
	$(VENV)/bin/megads plot runs/tiny --out runs/tiny/report.png

# The suite in two passes (tests/conftest.py says which tests are `serial` and why): the rest on
# TEST_WORKERS pytest-xdist workers, one intra-op thread each, then the serial ones alone; each
# pass ends with its slowest tests (--durations), to keep the suite well under 30 minutes.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile -m "not serial" --durations=15 tests
	$(PY) -m pytest -q -x -m serial --durations=5 tests

bench: $(STAMP)
	$(PY) bench/model.py

clean:
	rm -rf build *.egg-info megads/_C*.so
