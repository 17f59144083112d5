// CPU kernels of the fused multi-LoRA linear (fastcp._C), registered as torch ops.
//
// Routed (one adapter per row, SGMV-style): rows are grouped by adapter through a stable sort of
// the ids (x itself is never permuted); each adapter's group runs two small GEMMs (shrink to rank
// r, expand to out) and is scattered back with index_add_. Cost: one base GEMM + Σ_k n_k·r·(in+out),
// against K·M·r·(in+out) for the dense reference.
// Groups run in parallel over adapters (at::parallel_for) when there are enough of them.
// Dense (per-row gates g [M, K]): all K adapters are one LoRA of rank K·r with the gated
// intermediate S ⊙ (g·s ⊗ 1_r) — two GEMMs whatever K is.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fastcp {
namespace {

struct Groups {
  at::Tensor order;                // rows sorted by adapter id (int64)
  std::vector<int64_t> start, end; // per adapter k: order[start[k]:end[k]] are its rows
};

Groups group_rows(const at::Tensor& row_ids, int64_t K) {
  auto ids = row_ids.to(at::kLong);
  auto sorted = ids.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto sorted_ids = std::get<0>(sorted);
  Groups g;
  g.order = std::get<1>(sorted);
  // counts of ids -1..K-1 (shifted by one)
  auto counts = (ids + 1).bincount(/*weights=*/{}, /*minlength=*/K + 1).cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  int64_t pos = c[0];  // skip the -1 rows
  for (int64_t k = 0; k < K; ++k) {
    g.start.push_back(pos);
    pos += c[k + 1];
    g.end.push_back(pos);
  }
  return g;
}

std::vector<double> scale_vector(const at::Tensor& scale) {
  auto sc = scale.to(at::kDouble).cpu().contiguous();
  return std::vector<double>(sc.data_ptr<double>(), sc.data_ptr<double>() + sc.numel());
}

// Runs fn(k) for every adapter k that has rows. With at least as many non-empty groups as
// threads, the groups run in parallel (at::parallel_for, one group per task; the small per-group
// GEMMs then run single-threaded inside the parallel region, which is what they are good at).
// With fewer groups, they run one after another and each GEMM uses the threads itself.
template <typename F>
void for_each_group(const Groups& g, const F& fn) {
  std::vector<int64_t> busy;
  for (size_t k = 0; k < g.start.size(); ++k)
    if (g.end[k] > g.start[k]) busy.push_back(static_cast<int64_t>(k));
  const int64_t n = static_cast<int64_t>(busy.size());
  if (n >= at::get_num_threads() && at::get_num_threads() > 1) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fn(busy[i]);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) fn(busy[i]);
  }
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && A.dim() == 3 && B.dim() == 3, "fastcp lora: bad ranks");
  TORCH_CHECK(x.size(1) == weight.size(1) && A.size(2) == x.size(1), "fastcp lora: in-features mismatch");
  TORCH_CHECK(B.size(0) == A.size(0) && B.size(1) == weight.size(0) && B.size(2) == A.size(1),
              "fastcp lora: lora_b shape mismatch");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == A.size(0), "fastcp lora: scale must be [K]");
}

at::Tensor base_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

}  // namespace

at::Tensor lora_routed_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                               const at::Tensor& row_ids) {
  check_common(x, weight, A, B, scale);
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == x.size(0), "fastcp lora: row_ids must be [M]");
  auto y = base_linear(x, weight, bias);
  const int64_t K = A.size(0);
  auto g = group_rows(row_ids, K);
  auto sc = scale_vector(scale);
  for_each_group(g, [&](int64_t k) {
    auto rows = g.order.slice(0, g.start[k], g.end[k]);
    auto xk = x.index_select(0, rows);
    auto s = at::mm(xk, A[k].t()).mul_(sc[k]);    // shrink [n, r]
    y.index_add_(0, rows, at::mm(s, B[k].t()));   // expand [n, out]; groups own disjoint rows of y
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_routed_backward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
    const at::Tensor& row_ids, const at::Tensor& dy, bool need_dx, bool need_da, bool need_db) {
  check_common(x, weight, A, B, scale);
  const int64_t K = A.size(0);
  auto g = group_rows(row_ids, K);
  auto sc = scale_vector(scale);
  // A gradient not asked for is an empty [0] tensor (not undefined), so fake kernels can mirror it.
  auto none = at::empty({0}, x.options());
  at::Tensor dx = need_dx ? at::mm(dy, weight) : none;
  at::Tensor dA = need_da ? at::zeros_like(A) : none;  // adapters without rows keep zero grads
  at::Tensor dB = need_db ? at::zeros_like(B) : none;
  // Each group writes only its own rows of dx and its own slices dA[k], dB[k]: no reductions
  // across threads, so the result does not depend on the thread count.
  for_each_group(g, [&](int64_t k) {
    const double s_k = sc[k];
    auto rows = g.order.slice(0, g.start[k], g.end[k]);
    auto xk = x.index_select(0, rows);
    auto dyk = dy.index_select(0, rows);
    auto u = at::mm(dyk, B[k]).mul_(s_k);  // s_k · dy B_k   [n, r]
    if (need_dx) dx.index_add_(0, rows, at::mm(u, A[k]));
    if (need_da) dA[k].copy_(at::mm(u.t(), xk));
    if (need_db) dB[k].copy_(at::mm(dyk.t(), at::mm(xk, A[k].t())).mul_(s_k));
  });
  return {dx, dA, dB};
}

namespace {
// [M, K] gates times scale, repeated r times along columns -> [M, K*r]
at::Tensor expanded_gates(const at::Tensor& gates, const at::Tensor& scale, int64_t r) {
  return (gates * scale.to(gates.scalar_type()).unsqueeze(0)).repeat_interleave(r, 1);
}
}  // namespace

at::Tensor lora_dense_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                              const at::Tensor& gates) {
  check_common(x, weight, A, B, scale);
  const int64_t K = A.size(0), r = A.size(1);
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == x.size(0) && gates.size(1) == K, "fastcp lora: gates must be [M, K]");
  auto y = base_linear(x, weight, bias);
  auto A_all = A.reshape({K * r, A.size(2)});                        // [K r, in]
  auto B_all = B.permute({1, 0, 2}).reshape({B.size(1), K * r});     // [out, K r]
  auto s = at::mm(x, A_all.t()).mul_(expanded_gates(gates, scale, r));
  return y.addmm_(s, B_all.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_dense_backward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
    const at::Tensor& gates, const at::Tensor& dy, bool need_dx, bool need_da, bool need_db, bool need_dg) {
  check_common(x, weight, A, B, scale);
  const int64_t K = A.size(0), r = A.size(1), M = x.size(0);
  auto A_all = A.reshape({K * r, A.size(2)});
  auto B_all = B.permute({1, 0, 2}).reshape({B.size(1), K * r});
  auto G = expanded_gates(gates, scale, r);   // [M, K r]
  auto u = at::mm(dy, B_all);                 // dy B    [M, K r]
  auto none = at::empty({0}, x.options());  // gradients not asked for (see the routed backward)
  at::Tensor dx = none, dA = none, dB = none, dg = none;
  at::Tensor s;
  if (need_db || need_dg) s = at::mm(x, A_all.t());  // x Aᵀ  [M, K r]
  auto ug = u * G;
  if (need_dx) dx = at::mm(dy, weight).addmm_(ug, A_all);
  if (need_da) dA = at::mm(ug.t(), x).reshape({K, r, A.size(2)});
  if (need_db) dB = at::mm(dy.t(), s * G).reshape({B.size(1), K, r}).permute({1, 0, 2}).contiguous();
  if (need_dg) dg = (u * s).reshape({M, K, r}).sum(-1).mul_(scale.to(u.scalar_type()).unsqueeze(0));
  return {dx, dA, dB, dg};
}

}  // namespace fastcp

TORCH_LIBRARY_IMPL(fastcp, CPU, m) {
  m.impl("lora_routed_forward", &fastcp::lora_routed_forward);
  m.impl("lora_routed_backward", &fastcp::lora_routed_backward);
  m.impl("lora_dense_forward", &fastcp::lora_dense_forward);
  m.impl("lora_dense_backward", &fastcp::lora_dense_backward);
}
