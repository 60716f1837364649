// cpu_isa / cpu_isa_paths (see isa.h): the path each CPU kernel's run-time dispatch takes, from the
// same predicates the kernels test (cpu_use_avx512() in vec_utils.h, the build's x86 macros), with the
// reason. The per-kernel conditions (dtype, head dim) are the ones stated in each kernel's file.
#include "cpu/isa.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
// __builtin_cpu_supports takes string literals only
bool cpu_has(const char* f) {
  const std::string s(f);
  if (s == "avx2") return __builtin_cpu_supports("avx2");
  if (s == "fma") return __builtin_cpu_supports("fma");
  if (s == "avx512f") return __builtin_cpu_supports("avx512f");
  if (s == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (s == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (s == "avx512bw") return __builtin_cpu_supports("avx512bw");
  return false;
}

bool no_avx512_env() {
  const char* e = std::getenv("FASTLM_CPU_NO_AVX512");
  return e != nullptr && e[0] == '1';
}

// Why the AVX-512 kernels run or not: "avx512f+dq+vl+bw, FASTLM_CPU_NO_AVX512 unset", "FASTLM_CPU_NO_AVX512=1",
// "CPU lacks avx512bw".
std::string avx512_reason() {
  if (cpu_use_avx512()) return "avx512f+dq+vl+bw, FASTLM_CPU_NO_AVX512 unset";
  std::string missing;
  for (const char* f : {"avx512f", "avx512dq", "avx512vl", "avx512bw"})
    if (!cpu_has(f)) missing += (missing.empty() ? "" : "+") + std::string(f);
  if (!missing.empty()) return "CPU lacks " + missing;
  return no_avx512_env() ? "FASTLM_CPU_NO_AVX512=1" : "AVX-512 disabled";
}
#endif

// The path of the at::vec code every kernel uses for its elementwise passes (fixed at build time).
std::string vec_path() {
#if defined(CPU_CAPABILITY_AVX2) || (defined(__AVX2__) && defined(__FMA__))
  return "avx2";
#elif defined(__aarch64__) && defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

std::string vec_reason() {
#if defined(__x86_64__) || defined(_M_X64)
  return vec_path() == "avx2" ? "built with -mavx2 -mfma (at::vec 256-bit)" : "built without AVX2 (at::vec generic)";
#elif defined(__aarch64__)
  return "aarch64 build (at::vec NEON)";
#else
  return "portable build (at::vec generic)";
#endif
}

}  // namespace

std::string cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_use_avx512()) return "avx512";
#endif
  return vec_path();
}

std::vector<std::string> cpu_isa_paths() {
  const std::string v = vec_path(), vr = vec_reason();
  std::vector<std::string> out;
  auto line = [&](const char* kernel, const std::string& path, const std::string& why) {
    out.push_back(std::string(kernel) + ": " + path + " (" + why + ")");
  };
#if defined(__x86_64__) || defined(_M_X64)
  const bool w = cpu_use_avx512();
  const std::string r = avx512_reason();
  const std::string wide = w ? "avx512" : v;
  line("layer_norm_fwd", v, vr);
  line("layer_norm_bwd", v, vr);
  line("attention_fwd", wide, r + "; GEMM micro-kernels and softmax");
  line("attention_bwd", wide, r + "; GEMM micro-kernels");
  line("decode_attention_fwd", w ? "avx512" : v,
       w ? r + "; fp32 with D % 16 == 0 and D <= 256, else " + v : r);
  line("linear_fwd", wide, r + "; <= 16 rows, more rows: at::linear (BLAS)");
  const char* vnni_env = std::getenv("FASTLM_INT8_VNNI");
  const bool int_off = vnni_env && vnni_env[0] == '0';
  const bool vnni = w && __builtin_cpu_supports("avx512vnni") && !int_off;
  const bool int16 = !w && v == "avx2" && !int_off;  // linear_argmax.cpp's / linear_int8.cpp's AVX2 int16 paths
  const std::string screen = vnni    ? "; int8 screen by VNNI integer dots (FASTLM_INT8_VNNI=0: fp32 dots)"
                             : int16 ? "; int8 screen by int16 integer dots, vpmaddwd, K <= 65536 (FASTLM_INT8_VNNI=0: "
                                       "fp32 dots)"
                                     : "; int8 screen by fp32 dots";
  const std::string screen_path = vnni ? "avx512-vnni" : int16 ? "avx2-int16" : wide;
  line("linear_argmax_fwd", screen_path, r + screen + " + exact recompute on linear_fwd's path");
  line("linear_topk_logits_fwd", screen_path, r + screen + " + exact recompute on linear_fwd's path");
  const std::string one_row = vnni    ? "; one row: VNNI, four int8 digits (FASTLM_INT8_VNNI=0: widening)"
                              : int16 ? "; one row: int16 digits, vpmaddwd (FASTLM_INT8_VNNI=0: widening)"
                                      : "";
  line("linear_int8_fwd", wide, r + "; int8 widened to fp32, <= 64 rows" + one_row + ", more rows: dequantize + BLAS");
#else
  line("layer_norm_fwd", v, vr);
  line("layer_norm_bwd", v, vr);
  line("attention_fwd", v, vr);
  line("attention_bwd", v, vr);
  line("decode_attention_fwd", v, vr);
  line("linear_fwd", v, vr + "; <= 16 rows, more rows: at::linear (BLAS)");
  line("linear_argmax_fwd", v, vr + "; no int8 screen: linear_fwd per row + argmax");
  line("linear_topk_logits_fwd", v, vr + "; no int8 screen: linear_fwd per row");
  line("linear_int8_fwd", v, vr + "; int8 widened to fp32, <= 64 rows, more rows: dequantize + BLAS");
#endif
  const std::string g = gelu_ffn_gemm_backend();
  const std::string gwhy = g == "onednn" ? "fp32 GEMMs: oneDNN (mkldnn::_linear_pointwise), fp16/bf16: BLAS"
                                         : "GEMMs: BLAS (at::mm; oneDNN unavailable or FASTLM_CPU_ONEDNN=0)";
  line("linear_gelu_fwd", v, gwhy + "; bias+GELU pass " + vr);
  line("linear_gelu_bwd", v, gwhy);
  line("gelu_ffn_fwd", v, gwhy + "; bias+GELU pass " + vr);
  line("gelu_ffn_bwd", v, gwhy);
  line("decode_layers", cpu_isa(), "linear_fwd, decode_attention_fwd and layer_norm_fwd's paths");
  return out;
}

}  // namespace fastlm::cpu
