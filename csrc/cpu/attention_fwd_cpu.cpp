// Fused attention forward on the CPU: the driver. It lays out float32 operands once
// (operands.h; O(N * D) extra memory, never N^2), hands (batch, head, query slice) tasks
// to the threads (task_queue.h), and runs them with the kernel variant the running CPU
// supports (isa/attention_kernels.h has the algorithm; isa_dispatch.cpp the choice).
#include <cmath>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/isa/kernel_tables.h"
#include "cpu/kernel_stats.h"
#include "cpu/operands.h"
#include "cpu/output_cache.h"
#include "cpu/sparse_lists.h"
#include "cpu/task_queue.h"

namespace fastattn::cpu {

namespace {
// Dense tiles: BM query rows share every K/V tile load; BN keys per step keep the (BM, BN)
// float32 score tile (64 KiB) and the K^T/V tiles in L2. From kLongKeys keys on, the K/V
// stream of a head no longer stays in cache between query tiles, and 128-row tiles (half the
// K/V traffic per row) win: N=16384 full forward +8-10% (fp32 and bf16), N=8192 +2%,
// N=4096 -5% (in-process A/B, AMD EPYC Zen 4 class, 2 threads).
constexpr int64_t kDenseBM = 64;
constexpr int64_t kDenseBMLong = 128;
constexpr int64_t kLongKeys = 12288;
constexpr int64_t kDenseBN = 256;
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, int64_t window_left, int64_t window_right,
                                                 const std::vector<at::Tensor>& block_mask, const ScoreMods& mods) {
  const KernelTable& kern = active_kernels();
  int64_t BM = k.size(2) >= kLongKeys ? kDenseBMLong : kDenseBM, BN = kDenseBN;
  FwdArgs a;
  a.lists = sparse_lists_from(block_mask, BM, BN);
  a.s = make_shape(q, k, v, BM, BN, window_left, window_right);
  a.mods = mods;
  const Shape& s = a.s;
  // Under a causal/window rule, block-mask blocks taller than kSliceM rows (and a multiple
  // of it) run as kSliceM-row slices, so partial tiles can drop the keys none of the slice's
  // rows sees; without a rule, whole blocks keep each K/V tile load shared by more rows.
  const bool rule = !(window_left < 0 && window_right < 0);
  a.TM = (rule && BM > kSliceM && BM % kSliceM == 0) ? kSliceM : BM;
  a.NQT = (s.Nq + a.TM - 1) / a.TM;

  // Operands (kernel_args.h). q stays as given: each task converts and scales its rows.
  // float32 V and the float32 output are used in place when their rows are whole vectors
  // (Dv a multiple of 16); otherwise they go through padded float32 copies.
  at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  a.q_elem = elem_of(qc);
  a.q = qc.data_ptr();
  a.sq_b = qc.stride(0), a.sq_h = qc.stride(1), a.sq_n = qc.stride(2);
  a.scale_log2 = static_cast<float>(scale) * 1.4426950408889634f;
  // Non-finite policy (DESIGN.md): V rows holding NaN/inf reach only the rows that see them.
  // One O(N * Dv) read (min and max are finite iff every value is; NaN propagates through
  // both); the per-key flags exist only when some value is not finite.
  at::Tensor vbad;
  const auto v_finite = [&] {
    if (v.numel() == 0) return true;
    const auto mm = at::aminmax(v);
    return std::isfinite(std::get<0>(mm).item<double>()) && std::isfinite(std::get<1>(mm).item<double>());
  };
  if (!v_finite()) {
    vbad = at::logical_not(at::isfinite(v)).any(-1).contiguous();  // (B, Hkv, Nk) bool
    a.vbad = reinterpret_cast<const uint8_t*>(vbad.data_ptr<bool>());
  }
  a.bf16 = use_bf16_dot(kern, q, k, v, BM, BN);
  const bool f32 = q.scalar_type() == at::kFloat, whole = s.Dv == s.Dvp;
  at::Tensor kt, v32, kt_state;
  if (a.bf16) {  // bfloat16 paired operands (kernel_args.h)
    kt = key_panels_paired_bf16(k, s.NKB, BN, s.BNp, s.Dp, kSlotKt);  // (B, Hkv, NKB, Dp/2, BNp, 2)
    v32 = row_pairs_bf16(v, s.NKB * BN, s.Dvp, kSlotV);              // (B, Hkv, NKB*BN/2, Dvp, 2)
    a.kt2 = u16(kt);
    a.v2 = u16(v32);
  } else {
    if (k.scalar_type() == at::kFloat && k.stride(3) == 1) {
      // float32 K: each panel is transposed by the first task that needs it (FwdArgs::kt_state),
      // from cache into the products; a separate pass over K before the tasks cost a sliding
      // window forward ~4 ms of ~55 (N=16384, H=8: 32 MB read, written and read again).
      kt = workspace(kSlotKt, {s.B, s.Hkv, s.NKB, s.D, s.BNp}, k.options());
      kt_state = at::zeros({s.B * s.Hkv * s.NKB}, k.options().dtype(at::kInt));
      a.k = k.data_ptr<float>();
      a.sk_b = k.stride(0), a.sk_h = k.stride(1), a.sk_n = k.stride(2);
      a.kt_state = reinterpret_cast<uint32_t*>(kt_state.data_ptr<int32_t>());
    } else {
      kt = key_panels(k, s.NKB, BN, s.BNp, kSlotKt);  // (B, Hkv, NKB, D, BNp)
    }
    v32 = f32 && whole && v.stride(3) == 1 ? v : padded_f32(v, s.Nk, s.Dvp, 1.0, kSlotV);
    a.kt = kt.data_ptr<float>();
    a.v = v32.data_ptr<float>();
    a.ldv = v32.stride(2), a.sv_b = v32.stride(0), a.sv_h = v32.stride(1);
  }
  // large outputs come from the output cache (output_cache.h: no fresh pages every call)
  at::Tensor out = empty_output({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  at::Tensor out32 = f32 && whole ? out : empty_output({s.B, s.Hq, s.Nq, s.Dvp}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({s.B, s.Hq, s.Nq}, q.options().dtype(at::kFloat));
  a.out = out32.data_ptr<float>();
  a.ldo = out32.stride(2), a.so_b = out32.stride(0), a.so_h = out32.stride(1);
  a.lse = lse.data_ptr<float>();

  const int64_t scratch = kern.fwd_scratch_floats(a);
  KernelStats& stats = kernel_stats();
  a.visits = &stats.fwd_visits;
  if (a.bf16) add_visits(&stats.fwd_bf16_dot, 1);
  __atomic_store_n(&stats.fwd_threads, uint64_t{0}, __ATOMIC_RELAXED);
  run_task_queue(s.B * s.Hq * a.NQT, scratch, &stats.fwd_threads,
                 [&](int64_t begin, int64_t end, float* buf) { kern.fwd_tasks(a, begin, end, buf); });
  if (!out32.is_same(out)) out.copy_(out32.narrow(3, 0, s.Dv));
  return {out, lse};
}

}  // namespace fastattn::cpu
