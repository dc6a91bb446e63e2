// Plain data handed from the CPU drivers (attention_fwd_cpu.cpp, attention_bwd_cpu.cpp:
// tensor prep, threading) to the per-ISA kernels (isa/kernels_*.cpp), and the table of
// kernel entry points one ISA variant exports.
//
// Everything here is POD with no functions: this header is included by code compiled for
// different ISAs, so nothing in it may be emitted as a shared (COMDAT) symbol.
#pragma once

#include <cstdint>

namespace fastattn::cpu {

// Element type of an input left in its own dtype (the kernels convert it to float32).
enum class Elem : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Score modifiers (score_mods.h has the formulas): softcap, ALiBi, counter-based dropout.
struct ScoreMods {
  float softcap = 0.f;            // natural units; 0 = off
  const float* slopes = nullptr;  // (B, Hq) float32, or nullptr
  float dropout_p = 0.f;
  uint32_t seed_lo = 0, seed_hi = 0, threshold = 0;  // threshold = round(p * 2^24)
  int64_t Hq = 1;
};

// Raw view of the block lists (common/block_mask_fields.h; sparse_lists.h fills it).
struct SparseLists {
  bool active = false;
  int64_t Bm = 1, Hm = 1, NQB = 0, NKB = 0;
  int64_t kmax = 0, kmaxf = 0, qmax = 0, qmaxf = 0;  // widths of the index tensors
  const int32_t *kv_num = nullptr, *kv_idx = nullptr, *fkv_num = nullptr, *fkv_idx = nullptr, *kv_mid = nullptr;
  const int32_t *q_num = nullptr, *q_idx = nullptr, *fq_num = nullptr, *fq_idx = nullptr, *q_mid = nullptr;
  const uint8_t* masks = nullptr;  // (P, BLOCK_M, BLOCK_N)
};

// Operand layouts prepared by the drivers (float32, zero-padded; Dp, Dvp, BNp multiples of
// kPad so every vector load of every ISA variant stays inside its buffer):
//   q   (B, Hq, Nq, Dp)          rows of Q (the forward scales it by scale*log2e first)
//   kt  (B, Hkv, NKB, D, BNp)    K^T, one (D x BNp) panel per key tile: S = Q K^T
//   k   (B, Hkv, Nk, Dp)         rows of K (backward: dQ += dS K)
//   v   (B, Hkv, NKB*BN, Dvp)    rows of V: O += P V
//   vt  (B, Hkv, NKB, Dv, BNp)   V^T panels (backward: dP = dO V^T)
// The bfloat16 dot-product path (variants with bf16_dot, bfloat16 inputs; isa/gemm_bf16.h)
// takes bfloat16 operands instead, "paired": element pairs along the product's summed
// dimension sit next to each other, one 32-bit word per output column (the VNNI layout
// vdpbf16ps reads). NqE = Nq rounded up to even; NKB*BN is even (BN is):
//   kt2 (B, Hkv, NKB, Dp/2, BNp, 2)   K^T panels, pairs of d          S = Q K^T
//   v2  (B, Hkv, NKB*BN/2, Dvp, 2)    V, pairs of keys                O += P V
//   qb  (B, Hq, Nq, Dp)               Q rows (A operand of S)
//   qT  (B, Hq, Dp, NqE)              Q^T rows (A operand of dK^T += Q^T dS)
//   k2  (B, Hkv, NKB*BN/2, Dp, 2)     K, pairs of keys                dQ += dS K
//   vt2 (B, Hkv, NKB, Dvp/2, BNp, 2)  V^T panels, pairs of dv         dP = dO V^T
//   dob (B, Hq, Nq, Dvp)              dO rows (A operand of dP)
//   doT (B, Hq, Dvp, NqE)             dO^T rows (A operand of dV^T += dO^T P)
constexpr int64_t kPad = 16;

struct Shape {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv, Dp, Dvp;
  int64_t BM, BN, BNp, NKB;  // tile rows / keys (block-mask blocks when sparse), padded keys
  int64_t left, right;       // token window, bottom-right aligned, -1 = unbounded
};

struct FwdArgs {
  Shape s;
  int64_t TM, NQT;       // rows per task slice, tasks per (b, h)
  Elem q_elem;           // q in its own dtype and strides; each task converts and scales
  const void* q;         // its TM rows into scratch (times scale * log2e)
  int64_t sq_b, sq_h, sq_n;
  float scale_log2;
  float* kt;             // K^T panels (written by the tasks when kt_state is set)
  // Lazily built K^T panels (float32 K with unit-stride rows): instead of one pass over K
  // before the tasks, the first task that needs a panel transposes it from K (rows k +
  // b*sk_b + h*sk_h + j*sk_n) into kt; kt_state (B, Hkv, NKB) marks it 0 unbuilt,
  // 1 being built, 2 ready. The panel then goes from cache to the products instead of a
  // round trip through memory. nullptr: kt was built before the tasks.
  const float* k = nullptr;
  int64_t sk_b = 0, sk_h = 0, sk_n = 0;
  uint32_t* kt_state = nullptr;
  const float* v;        // V rows (B, Hkv, >= Nk, ...), row stride ldv, batch/head strides
  int64_t ldv, sv_b, sv_h;
  float* out;            // float32 rows, row stride ldo, batch/head strides so_b, so_h
  int64_t ldo, so_b, so_h;
  float* lse;            // (B, Hq, Nq) natural log
  const uint8_t* vbad = nullptr;  // (B, Hkv, Nk): 1 where a V row holds NaN/inf; nullptr if none
  SparseLists lists;
  ScoreMods mods;
  int64_t* visits = nullptr;  // += blocks computed (kernel_stats.h), or null
  // bfloat16 dot-product path (only with a bf16_dot table; then kt and v are unused)
  bool bf16 = false;
  const uint16_t *kt2 = nullptr, *v2 = nullptr;
};

struct BwdArgs {
  Shape s;
  int64_t TM, S;          // query rows per slice; dQ split count
  float scale;            // softmax scale (natural)
  const float *q, *qs;    // Q rows (B, Hq, Nq, Dp), unscaled and scaled by scale*log2e
  const float *kt, *k;    // K^T panels, K rows (B, Hkv, Nk, Dp)
  const float *vt;        // V^T panels
  const float* dout;      // (B, Hq, Nq, Dvp)
  const float* delta;     // (B, Hq, Nq): rowsum(dO * O) - dlse
  const float* lse2;      // (B, Hq, Nq): lse * log2e, +inf for rows that saw no key
  float *dq, *dk, *dv;    // (S, B, Hq, Nq, Dp), (B, Hkv, Nk, Dp), (B, Hkv, Nk, Dvp)
  SparseLists lists;
  ScoreMods mods;
  int64_t* visits = nullptr;  // += blocks computed (kernel_stats.h), or null
  // bfloat16 dot-product path (only with a bf16_dot table; then q, qs, kt, k, vt, dout are
  // unused): the paired layouts above
  bool bf16 = false;
  const uint16_t *qb = nullptr, *qT = nullptr, *kt2 = nullptr, *k2 = nullptr, *vt2 = nullptr, *dob = nullptr,
                 *doT = nullptr;
};

// Split-KV decode (decode_cpu.cpp drives, isa/decode_kernels.h computes phase 1): a task is
// (batch, kv head, split s) and serves the R = G * Nq query rows of the kv head's group
// against the cache keys of chunk s; q/k/v stay in their dtype and strides (the kernel
// converts each key tile once, for all R rows).
struct DecodeArgs {
  int64_t B, Hq, Hkv, Nq, D, Dv, Dp, Dvp, Ncache, S, chunk;
  int64_t window_left, window_right;  // relative to each row's own position, -1 = unbounded
  Elem elem;
  const void *q, *k, *v;
  int64_t sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n;  // element strides (dim 3 unit)
  const int64_t* lens;  // (B) valid cache length per row
  float scale_log2;
  float* o_part;        // (B, Hkv, S, R, Dv) partial outputs
  float* l_part;        // (B, Hkv, S, R) partial lse, log2 units (-inf: nothing seen)
  ScoreMods mods;
};

// Per-thread scratch the drivers allocate: scratch_floats(...) floats, 64-byte aligned.
struct KernelTable {
  const char* name;      // "generic", "avx2", "avx512", "avx512bf16"
  // forward: tasks [begin, end) of B * Hq * NQT
  void (*fwd_tasks)(const FwdArgs&, int64_t begin, int64_t end, float* scratch);
  int64_t (*fwd_scratch_floats)(const FwdArgs&);
  // backward: tasks [begin, end) of B * Hkv * S
  void (*bwd_tasks)(const BwdArgs&, int64_t begin, int64_t end, float* scratch);
  int64_t (*bwd_scratch_floats)(const BwdArgs&);
  // decode phase 1: tasks [begin, end) of B * Hkv * S
  void (*decode_tasks)(const DecodeArgs&, int64_t begin, int64_t end, float* scratch);
  int64_t (*decode_scratch_floats)(const DecodeArgs&);
  // true: fwd/bwd take the bfloat16 paired operands (args.bf16) for bfloat16 inputs
  bool bf16_dot = false;
};

}  // namespace fastattn::cpu
