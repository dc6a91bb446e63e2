// Fused attention backward on the CPU: the driver (the algorithm is in
// isa/attention_kernels.h). Probabilities are recomputed tile by tile from the saved lse;
// nothing N x N is stored. Tasks are (batch, kv head, split); a task owns key tiles
// kt = split, split + S, ... and writes their dK/dV rows; each split accumulates dQ in its
// own float32 buffer, summed in split order at the end (no atomics). S depends on the
// problem's shape only, never on the thread count, so results are bitwise reproducible.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/isa/kernel_tables.h"
#include "cpu/kernel_stats.h"
#include "cpu/operands.h"
#include "cpu/output_cache.h"
#include "cpu/task_queue.h"
#include "cpu/sparse_lists.h"

namespace fastattn::cpu {

namespace {
constexpr int64_t kDenseBM = 64;   // query rows per tile
constexpr int64_t kDenseBN = 128;  // keys per tile
// From kWideKeys keys on, 256-key tiles: each pass over a key tile's query rows (Q, dO,
// lse, delta) then serves twice the keys: 3-8% faster backward at N=4096..16384 (fp32/bf16,
// causal/full; in-process A/B, AMD EPYC Zen 4 class, 2 threads). Shorter sequences keep 128
// so that B * Hkv = 1 still splits into enough tasks.
constexpr int64_t kDenseBNWide = 256;
constexpr int64_t kWideKeys = 2048;
// Split dQ until there are at least this many (batch, kv head, split) tasks: enough to
// keep a many-core CPU busy at batch 1, and a constant, so thread counts never change S.
constexpr int64_t kMinBwdTasks = 8;
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, double scale, int64_t window_left,
    int64_t window_right, const std::vector<at::Tensor>& block_mask, const ScoreMods& mods) {
  const KernelTable& kern = active_kernels();
  int64_t BM = kDenseBM, BN = k.size(2) >= kWideKeys ? kDenseBNWide : kDenseBN;
  BwdArgs a;
  a.lists = sparse_lists_from(block_mask, BM, BN);
  a.s = make_shape(q, k, v, BM, BN, window_left, window_right);
  a.mods = mods;
  a.scale = static_cast<float>(scale);
  const Shape& s = a.s;
  a.TM = std::min(BM, kSliceM);  // rows per slice (the last may be shorter)
  const int64_t units = s.B * s.Hkv;
  a.S = units >= kMinBwdTasks ? 1 : std::min<int64_t>(s.NKB, (kMinBwdTasks + units - 1) / units);

  const double log2e = 1.4426950408889634;
  // float32 inputs whose rows are whole vectors (D, Dv multiples of 16) are used in place
  // (contiguous); others get zero-padded float32 copies. The kernels read only real rows.
  auto rows_f32 = [](const at::Tensor& x, int64_t cols, int slot) {
    return x.scalar_type() == at::kFloat && x.size(3) == cols ? x.contiguous()
                                                               : padded_f32(x, x.size(2), cols, 1.0, slot);
  };
  a.bf16 = use_bf16_dot(kern, q, k, v, BM, BN);
  at::Tensor q32, qs, kt, k32, vt, do32, doT;
  if (a.bf16) {  // bfloat16 paired operands (kernel_args.h)
    q32 = padded_as(q, s.Nq, s.Dp, at::kBFloat16, kSlotQ);               // qb  (B, Hq, Nq, Dp)
    qs = transposed_bf16(q, s.Dp, kSlotQs);                               // qT  (B, Hq, Dp, NqE)
    kt = key_panels_paired_bf16(k, s.NKB, BN, s.BNp, s.Dp, kSlotKt);      // kt2 (B, Hkv, NKB, Dp/2, BNp, 2)
    k32 = row_pairs_bf16(k, s.NKB * BN, s.Dp, kSlotK);                    // k2  (B, Hkv, NKB*BN/2, Dp, 2)
    vt = key_panels_paired_bf16(v, s.NKB, BN, s.BNp, s.Dvp, kSlotVt);     // vt2 (B, Hkv, NKB, Dvp/2, BNp, 2)
    do32 = padded_as(dout, s.Nq, s.Dvp, at::kBFloat16, kSlotDo);         // dob (B, Hq, Nq, Dvp)
    doT = transposed_bf16(dout, s.Dvp, kSlotDoT);                         // doT (B, Hq, Dvp, NqE)
    a.qb = u16(q32), a.qT = u16(qs), a.kt2 = u16(kt), a.k2 = u16(k32), a.vt2 = u16(vt), a.dob = u16(do32);
    a.doT = u16(doT);
  } else {
    q32 = rows_f32(q, s.Dp, kSlotQ);                             // (B, Hq, Nq, Dp)
    qs = padded_f32(q, s.Nq, s.Dp, scale * log2e, kSlotQs);      // scaled, log2 units
    kt = key_panels(k, s.NKB, BN, s.BNp, kSlotKt);               // (B, Hkv, NKB, D, BNp)
    k32 = rows_f32(k, s.Dp, kSlotK);                             // (B, Hkv, Nk, Dp)
    vt = key_panels(v, s.NKB, BN, s.BNp, kSlotVt);               // (B, Hkv, NKB, Dv, BNp)
    do32 = rows_f32(dout, s.Dvp, kSlotDo);                       // (B, Hq, Nq, Dvp)
    a.q = q32.data_ptr<float>();
    a.qs = qs.data_ptr<float>();
    a.kt = kt.data_ptr<float>();
    a.k = k32.data_ptr<float>();
    a.vt = vt.data_ptr<float>();
    a.dout = do32.data_ptr<float>();
  }
  at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);  // (B, Hq, Nq)
  if (dlse.has_value() && dlse->defined()) delta = delta - dlse->to(at::kFloat);
  delta = delta.contiguous();
  // lse in log2 units; rows that saw no key get +inf so exp2(S - lse) = 0 there.
  at::Tensor lse2 = at::where(at::isinf(lse) & (lse < 0), at::full({}, INFINITY, lse.options()), lse * log2e)
                        .to(at::kFloat)
                        .contiguous();
  // large gradients come from the output cache (output_cache.h: no fresh pages every call)
  at::Tensor dq_acc = empty_output({a.S, s.B, s.Hq, s.Nq, s.Dp}, q.options().dtype(at::kFloat)).zero_();
  at::Tensor dk32 = empty_output({s.B, s.Hkv, s.Nk, s.Dp}, q.options().dtype(at::kFloat));
  at::Tensor dv32 = empty_output({s.B, s.Hkv, s.Nk, s.Dvp}, q.options().dtype(at::kFloat));
  a.delta = delta.data_ptr<float>();
  a.lse2 = lse2.data_ptr<float>();
  a.dq = dq_acc.data_ptr<float>();
  a.dk = dk32.data_ptr<float>();
  a.dv = dv32.data_ptr<float>();

  const int64_t scratch = kern.bwd_scratch_floats(a);
  KernelStats& stats = kernel_stats();
  a.visits = &stats.bwd_visits;
  if (a.bf16) add_visits(&stats.bwd_bf16_dot, 1);
  __atomic_store_n(&stats.bwd_threads, uint64_t{0}, __ATOMIC_RELAXED);
  run_task_queue(units * a.S, scratch, &stats.bwd_threads,
                 [&](int64_t begin, int64_t end, float* buf) { kern.bwd_tasks(a, begin, end, buf); });

  at::Tensor dq = a.S == 1 ? dq_acc.select(0, 0) : dq_acc.sum(0);
  auto cut = [](const at::Tensor& x, int64_t rows, int64_t cols, at::ScalarType dt) {
    return x.narrow(2, 0, rows).narrow(3, 0, cols).to(dt).contiguous();
  };
  return {cut(dq, s.Nq, s.D, q.scalar_type()), cut(dk32, s.Nk, s.D, k.scalar_type()),
          cut(dv32, s.Nk, s.Dv, v.scalar_type())};
}

}  // namespace fastattn::cpu
