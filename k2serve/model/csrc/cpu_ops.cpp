// The `k2serve::` ops' CPU kernels (schemas and fake kernels: k2serve/model/cpu_kernels.py): each checks
// its tensors, allocates its output and scratch, and calls the C kernel of csrc/cpu_gemv.c it is linked
// with. In C++ rather than Python because a captured decode step makes ~65 of these calls: a Python
// kernel (checks, allocations, ctypes) cost 5-15 us of each on top of the dispatcher; here ~1 us.
// Bad input raises ValueError (TORCH_CHECK_VALUE) with the message the Python version gave.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <sstream>
#include <string>

extern "C" {
void k2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int T, int N, int D);
int k2_moe_bf16(const void *, const void *, const void *, const void *, const void *, void *, void *, void *, int,
                int, int, int, int);
int k2_moe_bf16_grouped(const void *, const void *, const void *, const void *, const void *, void *, void *,
                        void *, void *, void *, void *, void *, int, int, int, int, int);
int k2_moe_bf16_amx(const void *, const void *, const void *, const void *, const void *, void *, void *, void *,
                    void *, void *, void *, void *, void *, int, int, int, int, int);
int k2_moe_int4(const void *, const void *, const void *, const void *, const void *, const void *, const void *,
                void *, void *, void *, void *, int, int, int, int, int, int);
int k2_moe_int4_grouped(const void *, const void *, const void *, const void *, const void *, const void *,
                        const void *, void *, void *, void *, void *, void *, void *, void *, void *, int, int, int,
                        int, int, int);
int k2_linear_int4(const void *x, const void *w, const void *sz, void *y, int T, int N, int K, int group);
void k2_dequant_int4(const void *w, const void *sz, void *out, int N, int K, int group);
int k2_mla_decode(const void *qn, const void *qpe, const void *kv, const void *tables, const void *pos,
                  const void *wkv, float scale, void *scratch, void *lat, void *out, int B, int H, int dn, int dr,
                  int C, int dv, int NB, int bs, int blocks);
int k2_amx_chunks(int R, int E);
int k2_cpu_gemv_supported(void);
int k2_amx_enabled(void);
int k2_int4_tiles_ok(void);
}

namespace {

using at::Tensor;

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kByte: return "torch.uint8";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// (a, b) as Python prints a shape tuple.
std::string shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); i++) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

void check(const char *name, const Tensor &t, at::ScalarType dtype, int64_t dims) {
  bool contiguous = t.is_contiguous();
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == dims && t.device().is_cpu() && contiguous, name,
                    " must be a contiguous ", dims, "-d ", dtype_name(dtype), " CPU tensor, got ",
                    shape(t.sizes()), " ", dtype_name(t.scalar_type()), " on ", t.device().str(),
                    contiguous ? "" : ", not contiguous");
}

int i32(int64_t v) { return static_cast<int>(v); }

// The kernels run AVX512-BF16 instructions: loading the library registers these ops on any x86-64 CPU
// (cpu_kernels.available() is False where it lacks them), so each op checks before its first kernel call.
void require_cpu() {
  static const bool ok = k2_cpu_gemv_supported() != 0;
  TORCH_CHECK(ok, "native CPU kernels unavailable: this CPU has no AVX512-BF16");
}

Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) { return at::empty(sizes, at::TensorOptions().dtype(dtype)); }

// A kernel's bad-id return (1 + the flat (token, slot) position; 0: every id fits) as a ValueError.
void refuse_bad_id(int bad, const Tensor &ids, int64_t experts) {
  if (!bad) return;
  int64_t r = bad - 1, k = ids.size(1);
  TORCH_CHECK_VALUE(false, "expert id ", ids.data_ptr<int64_t>()[r], " at (token, slot) (", r / k, ", ", r % k,
                    ") is outside [0, ", experts, ")");
}

void check_routing(const Tensor &x, const Tensor &weights, const Tensor &ids) {
  check("x", x, at::kBFloat16, 2);
  check("weights", weights, at::kFloat, 2);
  check("ids", ids, at::kLong, 2);
}

struct Sizes {
  int64_t t, k, e, d, inter;
};

Sizes bf16_sizes(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13, const Tensor &w2) {
  check_routing(x, weights, ids);
  check("w13", w13, at::kBFloat16, 3);
  check("w2", w2, at::kBFloat16, 3);
  Sizes s{ids.size(0), ids.size(1), w2.size(0), w2.size(1), w2.size(2)};
  bool fit = x.size(0) == s.t && x.size(1) == s.d && weights.size(0) == s.t && weights.size(1) == s.k &&
             w13.size(0) == s.e && w13.size(1) == 2 * s.inter && w13.size(2) == s.d;
  TORCH_CHECK_VALUE(fit, "shapes do not fit: x ", shape(x.sizes()), ", weights ", shape(weights.sizes()), ", ids ",
                    shape(ids.sizes()), ", w13 ", shape(w13.sizes()), ", w2 ", shape(w2.sizes()));
  return s;
}

Tensor linear_bf16(const Tensor &x, const Tensor &w) {
  require_cpu();
  check("x", x, at::kBFloat16, 2);
  check("w", w, at::kBFloat16, 2);
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), "x has ", x.size(1), " features, w ", w.size(1));
  Tensor y = empty({x.size(0), w.size(0)}, at::kBFloat16);
  k2_linear_bf16(static_cast<const uint16_t *>(x.data_ptr()), static_cast<const uint16_t *>(w.data_ptr()),
                 static_cast<uint16_t *>(y.data_ptr()), i32(x.size(0)), i32(w.size(0)), i32(x.size(1)));
  return y;
}

Tensor moe_bf16(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13, const Tensor &w2) {
  require_cpu();
  Sizes s = bf16_sizes(x, weights, ids, w13, w2);
  Tensor act = empty({s.t * s.k, s.inter}, at::kBFloat16), acc = empty({s.t, s.d}, at::kFloat);
  Tensor out = empty({s.t, s.d}, at::kBFloat16);
  refuse_bad_id(k2_moe_bf16(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13.data_ptr(), w2.data_ptr(),
                            act.data_ptr(), acc.data_ptr(), out.data_ptr(), i32(s.t), i32(s.k), i32(s.d),
                            i32(s.inter), i32(s.e)),
                ids, s.e);
  return out;
}

Tensor moe_bf16_grouped(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13,
                        const Tensor &w2) {
  require_cpu();
  Sizes s = bf16_sizes(x, weights, ids, w13, w2);
  int64_t rows = s.t * s.k;
  Tensor act = empty({rows, s.inter}, at::kBFloat16), yw = empty({rows, s.d}, at::kFloat);
  Tensor order = empty({rows}, at::kInt), start = empty({s.e + 1}, at::kInt);
  Tensor xs = empty({rows}, at::kLong), used = empty({s.e}, at::kInt), out = empty({s.t, s.d}, at::kBFloat16);
  refuse_bad_id(k2_moe_bf16_grouped(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13.data_ptr(),
                                    w2.data_ptr(), act.data_ptr(), yw.data_ptr(), order.data_ptr(),
                                    start.data_ptr(), xs.data_ptr(), used.data_ptr(), out.data_ptr(), i32(s.t),
                                    i32(s.k), i32(s.d), i32(s.inter), i32(s.e)),
                ids, s.e);
  return out;
}

// Scratch of the AMX expert op, kept per thread between calls (grown, never shrunk, up to 512 MB): a
// fresh 100 MB of scratch per prefill layer (2,048 tokens of `small`) is mapped anew by the allocator
// and faulted in page by page, ~40% of the call's time under perf.
constexpr int64_t kScratchKeepBytes = int64_t(512) << 20;

uint8_t *amx_scratch(int64_t bytes, Tensor &fresh) {
  thread_local Tensor kept;
  if (kept.defined() && kept.numel() >= bytes) return kept.data_ptr<uint8_t>();
  Tensor buf = empty({bytes}, at::kByte);
  if (bytes <= kScratchKeepBytes) kept = buf;
  fresh = buf;
  return buf.data_ptr<uint8_t>();
}

int64_t round64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

Tensor moe_bf16_amx(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13, const Tensor &w2) {
  require_cpu();
  Sizes s = bf16_sizes(x, weights, ids, w13, w2);
  TORCH_CHECK_VALUE(s.d % 64 == 0 && s.inter % 32 == 0, "experts of hidden ", s.d, ", intermediate ", s.inter,
                    ": AMX needs multiples of 64 and 32");
  TORCH_CHECK(k2_amx_enabled(), "AMX-BF16 is not available on this CPU / process");
  int64_t rows = s.t * s.k, chunks = k2_amx_chunks(i32(rows), i32(s.e));
  int64_t sizes[7] = {round64(chunks * s.d * 16 * 2), round64(chunks * s.inter * 16 * 2), round64(rows * s.d * 4),
                      round64(rows * 4), round64((s.e + 1) * 4), round64((s.e + 1) * 4), round64(s.e * 4)};
  int64_t total = 0;
  for (int64_t b : sizes) total += b;
  Tensor fresh;
  uint8_t *p[7];
  p[0] = amx_scratch(total, fresh);
  for (int i = 1; i < 7; i++) p[i] = p[i - 1] + sizes[i - 1];
  Tensor out = empty({s.t, s.d}, at::kBFloat16);
  refuse_bad_id(k2_moe_bf16_amx(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13.data_ptr(), w2.data_ptr(),
                                p[0], p[1], p[2], p[3], p[4], p[5], p[6], out.data_ptr(), i32(s.t), i32(s.k),
                                i32(s.d), i32(s.inter), i32(s.e)),
                ids, s.e);
  return out;
}

Sizes int4_sizes(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13, const Tensor &w13_sz,
                 const Tensor &w2, const Tensor &w2_sz, int64_t group) {
  check_routing(x, weights, ids);
  check("w13", w13, at::kByte, 3);
  check("w2", w2, at::kByte, 3);
  check("w13_sz", w13_sz, at::kBFloat16, 4);
  check("w2_sz", w2_sz, at::kBFloat16, 4);
  Sizes s{ids.size(0), ids.size(1), w2.size(0), w2.size(1), 2 * w2.size(2)};
  bool fit = group > 0 && x.size(0) == s.t && x.size(1) == s.d && weights.size(0) == s.t &&
             weights.size(1) == s.k && w13.sizes() == at::IntArrayRef({s.e, 2 * s.inter, s.d / 2}) &&
             w13_sz.sizes() == at::IntArrayRef({s.e, s.d / group, 2 * s.inter, 2}) &&
             w2_sz.sizes() == at::IntArrayRef({s.e, s.inter / group, s.d, 2});
  TORCH_CHECK_VALUE(fit, "shapes do not fit: x ", shape(x.sizes()), ", weights ", shape(weights.sizes()), ", ids ",
                    shape(ids.sizes()), ", w13 ", shape(w13.sizes()), ", w13_sz ", shape(w13_sz.sizes()), ", w2 ",
                    shape(w2.sizes()), ", w2_sz ", shape(w2_sz.sizes()), ", group ", group);
  bool tiles = k2_int4_tiles_ok() && s.d % 64 == 0 && s.inter % 64 == 0 && s.d % group == 0 && s.inter % group == 0;
  TORCH_CHECK_VALUE(tiles, "INT4 experts of hidden ", s.d, ", intermediate ", s.inter, ", group ", group,
                    ": not this kernel's tiles");
  return s;
}

Tensor moe_int4(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13, const Tensor &w13_sz,
                const Tensor &w2, const Tensor &w2_sz, int64_t group) {
  require_cpu();
  Sizes s = int4_sizes(x, weights, ids, w13, w13_sz, w2, w2_sz, group);
  Tensor xf = empty({s.t, s.d}, at::kFloat), acc = empty({s.t, s.d}, at::kFloat);
  Tensor act = empty({s.t * s.k, s.inter}, at::kFloat), out = empty({s.t, s.d}, at::kBFloat16);
  refuse_bad_id(k2_moe_int4(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13.data_ptr(), w13_sz.data_ptr(),
                            w2.data_ptr(), w2_sz.data_ptr(), xf.data_ptr(), act.data_ptr(), acc.data_ptr(),
                            out.data_ptr(), i32(s.t), i32(s.k), i32(s.d), i32(s.inter), i32(s.e), i32(group)),
                ids, s.e);
  return out;
}

Tensor moe_int4_grouped(const Tensor &x, const Tensor &weights, const Tensor &ids, const Tensor &w13,
                        const Tensor &w13_sz, const Tensor &w2, const Tensor &w2_sz, int64_t group) {
  require_cpu();
  Sizes s = int4_sizes(x, weights, ids, w13, w13_sz, w2, w2_sz, group);
  int64_t rows = s.t * s.k;
  Tensor xf = empty({s.t, s.d}, at::kFloat), act = empty({rows, s.inter}, at::kFloat);
  Tensor yw = empty({rows, s.d}, at::kFloat), order = empty({rows}, at::kInt), start = empty({s.e + 1}, at::kInt);
  Tensor xs = empty({rows}, at::kLong), used = empty({s.e}, at::kInt), out = empty({s.t, s.d}, at::kBFloat16);
  refuse_bad_id(k2_moe_int4_grouped(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), w13.data_ptr(),
                                    w13_sz.data_ptr(), w2.data_ptr(), w2_sz.data_ptr(), xf.data_ptr(),
                                    act.data_ptr(), yw.data_ptr(), order.data_ptr(), start.data_ptr(),
                                    xs.data_ptr(), used.data_ptr(), out.data_ptr(), i32(s.t), i32(s.k), i32(s.d),
                                    i32(s.inter), i32(s.e), i32(group)),
                ids, s.e);
  return out;
}

// An INT4 weight w uint8 [N, K / 2] with sz bf16 [K / group, N, 2] checked, with the input x [T, K] it
// multiplies if there is one (nullptr: none): (N, K). The error message is formatted only on failure.
std::pair<int64_t, int64_t> int4_weight(const Tensor &w, const Tensor &sz, int64_t group, const Tensor *x) {
  check("w", w, at::kByte, 2);
  check("sz", sz, at::kBFloat16, 3);
  int64_t n = w.size(0), k = w.size(1) * 2;
  bool fit = group > 0 && k % group == 0 && sz.sizes() == at::IntArrayRef({k / group, n, 2}) &&
             (x == nullptr || x->size(1) == k);
  TORCH_CHECK_VALUE(fit, "shapes do not fit: ", x ? "x " + shape(x->sizes()) + ", " : std::string(), "w ",
                    shape(w.sizes()), ", sz ", shape(sz.sizes()), ", group ", group);
  TORCH_CHECK_VALUE(k2_int4_tiles_ok() && n % 64 == 0, "an INT4 weight of ", n, " x ", k,
                    ": not this kernel's tiles (blocks of 64 rows)");
  return {n, k};
}

Tensor linear_int4(const Tensor &x, const Tensor &w, const Tensor &sz, int64_t group) {
  require_cpu();
  check("x", x, at::kBFloat16, 2);
  auto [n, k] = int4_weight(w, sz, group, &x);
  Tensor y = empty({x.size(0), n}, at::kBFloat16);
  TORCH_CHECK(!k2_linear_int4(x.data_ptr(), w.data_ptr(), sz.data_ptr(), y.data_ptr(), i32(x.size(0)), i32(n), i32(k),
                              i32(group)),
              "linear_int4: no memory for ", x.size(0), " x ", k, " fp32 inputs");
  return y;
}

Tensor dequant_int4(const Tensor &w, const Tensor &sz, int64_t group) {
  require_cpu();
  auto [n, k] = int4_weight(w, sz, group, nullptr);
  Tensor out = empty({k, n}, at::kBFloat16);
  k2_dequant_int4(w.data_ptr(), sz.data_ptr(), out.data_ptr(), i32(n), i32(k), i32(group));
  return out;
}

Tensor mla_decode(const Tensor &q_nope, const Tensor &q_pe, const Tensor &kv, int64_t layer,
                  const Tensor &block_tables, const Tensor &positions, const Tensor &wkv, double scale) {
  require_cpu();
  check("q_nope", q_nope, at::kBFloat16, 3);
  check("q_pe", q_pe, at::kBFloat16, 3);
  check("kv", kv, at::kBFloat16, 4);
  check("block_tables", block_tables, at::kLong, 2);
  check("positions", positions, at::kLong, 1);
  check("wkv", wkv, at::kBFloat16, 2);
  int64_t b = q_nope.size(0), h = q_nope.size(1), dn = q_nope.size(2), dr = q_pe.size(2);
  int64_t layers = kv.size(0), blocks = kv.size(1), bs = kv.size(2), width = kv.size(3), c = width - dr;
  int64_t nb = block_tables.size(1), dv = h ? wkv.size(0) / h - dn : 0;
  bool fit = q_pe.size(0) == b && q_pe.size(1) == h && positions.size(0) == b && block_tables.size(0) == b &&
             dv > 0 && wkv.size(0) == h * (dn + dv) && wkv.size(1) == c && c % 16 == 0 && 0 <= layer &&
             layer < layers;
  TORCH_CHECK_VALUE(fit, "shapes do not fit: q_nope ", shape(q_nope.sizes()), ", q_pe ", shape(q_pe.sizes()), ", kv ",
                    shape(kv.sizes()), " (layer ", layer, "), block_tables ", shape(block_tables.sizes()),
                    ", positions ", shape(positions.sizes()), ", wkv ", shape(wkv.sizes()));
  Tensor scratch = empty({b * h, nb * bs}, at::kFloat);
  Tensor lat = empty({b * h, width + c}, at::kBFloat16);  // the absorbed queries, then the attended latents
  Tensor out = empty({b, h, dv}, at::kBFloat16);
  const uint16_t *at_layer = static_cast<const uint16_t *>(kv.data_ptr()) + layer * blocks * bs * width;
  int bad = k2_mla_decode(q_nope.data_ptr(), q_pe.data_ptr(), at_layer, block_tables.data_ptr(), positions.data_ptr(),
                          wkv.data_ptr(), static_cast<float>(scale), scratch.data_ptr(), lat.data_ptr(),
                          out.data_ptr(), i32(b), i32(h), i32(dn), i32(dr), i32(c), i32(dv), i32(nb), i32(bs),
                          i32(blocks));
  if (bad) {
    TORCH_CHECK_VALUE(false, "row ", bad - 1, ": position ", positions.data_ptr<int64_t>()[bad - 1],
                      " or its block table entries fall outside the ", nb, " x ", bs, " table / the pool's ", blocks,
                      " blocks");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(k2serve, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("moe_bf16", &moe_bf16);
  m.impl("moe_bf16_grouped", &moe_bf16_grouped);
  m.impl("moe_bf16_amx", &moe_bf16_amx);
  m.impl("moe_int4", &moe_int4);
  m.impl("moe_int4_grouped", &moe_int4_grouped);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequant_int4", &dequant_int4);
  m.impl("mla_decode", &mla_decode);
}
