// Which instruction-set path each CPU kernel takes on this machine, and why (torch.ops.fastlm_C.
// cpu_isa_paths / cpu_isa, shown by `fastlm info`; fastlm's measured "auto" keys its cache on cpu_isa).
// The extension is built for AVX2 + FMA on x86 (setup.py; fastlm/_ext.py refuses to load it on an x86
// CPU without them), the AVX-512 kernels are compiled with target attributes and chosen at run time
// (cpu_use_avx512 in vec_utils.h); on other CPUs (aarch64...) every kernel runs its portable
// at::vec / scalar code.
#pragma once
#include <string>
#include <vector>

namespace fastlm::cpu {

// "avx512", "avx2", "neon" or "scalar": the widest path fastlm's CPU kernels take here.
std::string cpu_isa();
// One line per CPU kernel: "<kernel>: <path> (<why>)".
std::vector<std::string> cpu_isa_paths();
// The GEMM of the fp32 gelu_ffn / linear_gelu: "onednn" (mkldnn::_linear_pointwise) or "blas" (gelu_ffn.cpp).
const char* gelu_ffn_gemm_backend();

}  // namespace fastlm::cpu
