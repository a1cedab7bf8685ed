# `make native`: build runtime/build/libseif_ort.so, the ai.seif custom-op library for ONNX
# Runtime (include this file from the top-level Makefile). ORT's headers are fetched once into
# runtime/third_party/ with a private apt configuration; CUDA kernels (sm_80, sm_90) are compiled
# when nvcc is found. SEIF_WITH_CUDA=ON|OFF forces the choice; `make native-cpu` skips CUDA.
.PHONY: native native-cpu native-selftest-cuda native-bench bench-kernels

native:
	runtime/build_library.sh

native-cpu:
	SEIF_WITH_CUDA=OFF runtime/build_library.sh

# GPU machines only: the CUDA kernels against the CPU kernels, without onnxruntime-gpu.
native-selftest-cuda:
	SEIF_WITH_CUDA=ON runtime/build_library.sh
	cmake --build runtime/build --target seif_cuda_selftest
	runtime/build/seif_cuda_selftest

# The CPU expert kernels alone, without ONNX Runtime or Python (runtime/csrc/kernel_bench.cpp;
# benchmarks/README.md, "Session 8"). `make test` builds it for its smoke test.
native-bench: native
	cmake --build runtime/build --target seif_kernel_bench

bench-kernels: $(STAMP) native-bench
	$(BIN)/python -m benchmarks.kernels
