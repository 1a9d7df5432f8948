// SPDX-License-Identifier: MIT
// The suite's shape table, names and byte formulas, the host buffers of a shape case, and the
// STREAM-like copy and triad baselines that every pass is compared with.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <list>
#include <string>
#include <utility>
#include <vector>

#include <bkn/backends/reference.hpp>

#include "bench.hpp"

namespace bkn_bench {
namespace {

// ---- The shapes. A line runs in each of its layouts, over the whole batch and once per listed
// group size (samples per statistics group: the paper's micro-batches). Add a line to add a
// shape; mark it huge to keep it out of default runs (--huge adds it). ----

struct table_line {
  std::vector<layout> layouts;
  bkn::tensor_shape shape;
  std::vector<index_t> group_sizes;  // besides the whole batch
  bool huge = false;
};

const std::vector<layout> images = {layout::nchw, layout::nhwc};
const std::vector<layout> rows = {layout::nc};

const std::vector<table_line>& full_table() {
  static const std::vector<table_line> table = {
      {images, {2, 64, 56, 56}, {}},        // ResNet stage 1 at a micro-batch of 2
      {images, {32, 64, 56, 56}, {2, 4}},   // the same at 32, in statistics groups
      {images, {8, 256, 14, 14}, {}},       // stage 3
      {images, {2, 512, 7, 7}, {}},         // stage 4, micro-batch
      {images, {256, 512, 7, 7}, {2, 4}},   // stage 4, large batch (25 MB per tensor)
      {rows, {2, 1024, 1, 1}, {}},          // a fully connected layer, micro-batch
      {rows, {128, 1024, 1, 1}, {2, 4}},
      {rows, {1024, 4096, 1, 1}, {2, 4}},   // 16 MB per tensor
      {images, {64, 64, 112, 112}, {}, true},  // ResNet stem: 205 MB per tensor
      // Groups of 2 to 16 pixels, where cutting groups into chunks starts to cost
      // (eigen_chunk_pixels): 16 MB per tensor each.
      {rows, {8192, 512, 1, 1}, {2, 4}, true},
      {images, {4096, 512, 2, 2}, {2, 4}, true},
  };
  return table;
}

// --smoke: tiny shapes that still take every path: both layouts, NC, statistics groups, and
// (4x32x24x24 = 73,728 elements) the Eigen backend's threaded passes.
const std::vector<table_line>& smoke_table() {
  static const std::vector<table_line> table = {
      {images, {4, 32, 24, 24}, {2}},
      {rows, {64, 256, 1, 1}, {2}},
  };
  return table;
}

const char* layout_name(layout l) {
  switch (l) {
    case layout::nchw: return "NCHW";
    case layout::nhwc: return "NHWC";
    case layout::nc: return "NC";
  }
  return "?";
}

const char* method_name(method m) {
  switch (m) {
    case method::bn: return "BN";
    case method::bkn_identity: return "BKN-identity";
    case method::bkn_dense: return "BKN-dense";
    case method::bkn_linear: return "BKN-linear";
    case method::bkn_conv: return "BKN-conv";
    case method::bkn_full: return "BKN-full";
  }
  return "?";
}

// Dense and linear transitions cost O(G C C') per pass in the per-channel math (predict, and the
// transition's backward), a convolution's O(G C C' taps): past this they are "huge".
constexpr double max_transition_work = double(index_t(1) << 26);
// Full covariance mode is O(C^2) per pixel (the Gram matrix and the mixing backward): the
// issue asks for it on C <= 256.
constexpr index_t max_full_channels = 256;

// The host layer of BKN-conv: 3x3, stride 1, zero padding 1, so its output keeps H x W.
bkn::conv2d_geometry conv_of(const shape_case& c) {
  bkn::conv2d_geometry g;
  g.in_height = c.shape.height;
  g.in_width = c.shape.width;
  g.kernel_height = g.kernel_width = 3;
  g.pad_height = g.pad_width = 1;
  return g;
}

bkn::layer_config config_of(const shape_case& c, method how) {
  bkn::layer_config cfg;
  cfg.channels = c.channels();
  cfg.groups = c.groups();
  switch (how) {
    case method::bn:
    case method::bkn_identity:
      cfg.transition = bkn::transition_kind::identity;
      break;
    case method::bkn_dense:
      cfg.transition = bkn::transition_kind::dense;
      cfg.in_channels = c.channels();
      break;
    case method::bkn_linear:
      cfg.transition = bkn::transition_kind::weights;  // linear layer (conv geometry all ones)
      cfg.in_channels = c.channels();
      cfg.act = bkn::activation::relu;
      break;
    case method::bkn_conv:
      cfg.transition = bkn::transition_kind::weights;
      cfg.in_channels = c.channels();
      cfg.act = bkn::activation::relu;
      cfg.conv = conv_of(c);
      break;
    case method::bkn_full:
      cfg.mode = bkn::covariance::full;
      cfg.transition = bkn::transition_kind::identity;
      break;
  }
  return cfg;
}

// Channel c of a value: an offset and a scale, so statistics differ from channel to channel.
float channel_offset(index_t c) { return 0.5f + 0.25f * float(c % 5); }
float channel_scale(index_t c) { return 1.0f + 0.5f * float(c % 3); }

// Deterministic values offset_c + scale_c * u, u uniform in [-1, 1).
void fill(buffer& v, const shape_case& c, std::uint32_t seed) {
  const index_t C = c.channels(), S = c.shape.spatial();
  std::uint32_t state = seed;
  for (std::size_t i = 0; i < v.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    const float u = float(state >> 8) * (2.0f / 16777216.0f) - 1.0f;
    const index_t ch = c.lay == layout::nchw ? (index_t(i) / S) % C : index_t(i) % C;
    v[i] = channel_offset(ch) + channel_scale(ch) * u;
  }
}

}  // namespace

std::string shape_case::shape_name() const {
  std::string s = std::to_string(shape.batch) + "x" + std::to_string(shape.channels);
  if (lay != layout::nc)
    s += "x" + std::to_string(shape.height) + "x" + std::to_string(shape.width);
  return s;
}

std::string shape_case::name() const {
  return std::string(layout_name(lay)) + "/" + shape_name() + "/gs=" +
         (group_size > 0 ? std::to_string(group_size) : std::string("all"));
}

std::vector<shape_case> shape_cases(const settings& s) {
  std::vector<shape_case> cases;
  for (const table_line& line : s.smoke ? smoke_table() : full_table()) {
    if (line.huge && !s.huge) continue;
    for (layout l : line.layouts) {
      std::vector<index_t> sizes = {0};
      sizes.insert(sizes.end(), line.group_sizes.begin(), line.group_sizes.end());
      for (index_t gs : sizes) cases.push_back({l, line.shape, gs, line.huge});
    }
  }
  return cases;
}

std::vector<benchmark_kind> benchmark_kinds(const shape_case& c, const settings& s) {
  std::vector<benchmark_kind> kinds = {{op::moments}, {op::affine}, {op::sums}, {op::affine_v},
                                       {op::inference}};
  std::vector<method> methods = {method::bn, method::bkn_identity, method::bkn_dense};
  methods.push_back(c.lay == layout::nc ? method::bkn_linear : method::bkn_conv);
  if (c.channels() <= max_full_channels) methods.push_back(method::bkn_full);
  const double matrix_work = double(c.groups()) * double(c.channels()) * double(c.channels());
  for (method m : methods) {
    const bool through_matrix =
        m == method::bkn_dense || m == method::bkn_linear || m == method::bkn_conv;
    const double work = m == method::bkn_conv ? 9 * matrix_work : matrix_work;
    if (through_matrix && work > max_transition_work && !s.huge) continue;
    for (op o : {op::forward, op::backward, op::forward_backward}) kinds.push_back({o, m});
  }
  return kinds;
}

std::string kind_name(const benchmark_kind& k) {
  switch (k.what) {
    case op::moments: return "moments";
    case op::affine: return "affine";
    case op::sums: return "sums";
    case op::affine_v: return "affine_v";
    case op::inference: return "inference";
    case op::forward: return std::string("forward_") + method_name(k.how);
    case op::backward: return std::string("backward_") + method_name(k.how);
    case op::forward_backward: return std::string("fwdbwd_") + method_name(k.how);
  }
  return "?";
}

bool peer_kind(const benchmark_kind& k) {
  return k.what == op::inference ||
         (k.how == method::bn &&
          (k.what == op::forward || k.what == op::backward || k.what == op::forward_backward));
}

double minimal_bytes(op what, const shape_case& c) {
  const double E = double(c.elements()), C = double(c.channels());
  const double GC = double(c.groups()) * C;
  double floats = 0;
  switch (what) {
    case op::moments: floats = E + 2 * GC; break;
    case op::affine: floats = 2 * E + 3 * GC; break;
    case op::sums: floats = 2 * E + 3 * GC; break;
    case op::affine_v: floats = 3 * E + 4 * GC; break;
    case op::inference:
    case op::forward: floats = 2 * E + 4 * C; break;
    case op::backward: floats = 3 * E + 5 * C; break;
    case op::forward_backward: floats = 5 * E + 9 * C; break;
  }
  return floats * sizeof(float);
}

index_t copy_elements(const shape_case& c) { return c.elements() + 2 * c.channels(); }
index_t triad_elements(const shape_case& c) {
  return c.elements() + (5 * c.channels() + 2) / 3;
}

// ---- layers ----

layer_setup::layer_setup(const shape_case& c, method how)
    : storage(config_of(c, how)), layer(storage.view()) {
  if (how == method::bn) return;
  prior_groups = c.groups();
  prior_channels = c.channels();
  const index_t C = prior_channels;
  const bool full = how == method::bkn_full;
  const std::size_t n = std::size_t(prior_groups * C);
  prior_mean.resize(n);
  prior_var.assign(full ? n * std::size_t(C) : n, 0.0f);  // full mode: diagonal matrices
  for (std::size_t i = 0; i < n; ++i) {
    prior_mean[i] = 0.2f + 0.01f * float(i % 13);
    prior_var[full ? i * std::size_t(C) + i % std::size_t(C) : i] = 0.8f + 0.02f * float(i % 7);
  }
  dprior_mean.assign(n, 0.0f);
  dprior_var.assign(prior_var.size(), 0.0f);
}

bkn::gaussian_view<const float> layer_setup::prior() const {
  if (prior_groups == 0) return {};
  return {bkn::span<const float>(prior_mean.data(), index_t(prior_mean.size())),
          bkn::span<const float>(prior_var.data(), index_t(prior_var.size())), prior_groups,
          prior_channels};
}

bkn::gaussian_view<float> layer_setup::dprior() {
  if (prior_groups == 0) return {};
  return {bkn::span<float>(dprior_mean), bkn::span<float>(dprior_var), prior_groups,
          prior_channels};
}

// ---- buffers ----

tensors::tensors(const shape_case& c) : case_(c) {
  const std::size_t E = std::size_t(c.elements());
  const index_t C = c.channels(), GC = c.groups() * C;
  x.resize(E);
  dy.resize(E);
  fill(x, c, 1u);
  fill(dy, c, 2u);
  y.assign(E, 0.0f);  // value-initialized: every page touched now, not in the timed loop
  dx.assign(E, 0.0f);
  for (auto* v : {&mean, &var, &a, &centre, &b, &k}) v->resize(std::size_t(GC));
  for (index_t i = 0; i < GC; ++i) {
    const index_t ch = i % C;
    const float s = channel_scale(ch);
    mean[i] = centre[i] = channel_offset(ch);
    var[i] = s * s / 3.0f;
    a[i] = 1.0f / std::sqrt(var[i] + 1e-5f);
    b[i] = 0.01f;
    k[i] = 0.1f;
  }
}

bkn::tensor_view<float> tensors::view(buffer& data) const {
  const bkn::tensor_shape& s = case_.shape;
  switch (case_.lay) {
    case layout::nchw: return bkn::nchw(data.data(), s.batch, s.channels, s.height, s.width);
    case layout::nhwc: return bkn::nhwc(data.data(), s.batch, s.channels, s.height, s.width);
    case layout::nc: return bkn::nc(data.data(), s.batch, s.channels);
  }
  return {};
}

bkn::span<std::byte> tensors::workspace(std::size_t bytes) {
  if (!workspace_ || bytes > workspace_bytes_) {
    workspace_.reset();
    workspace_ = std::make_unique<bkn::host_workspace>(bytes);  // zeroed: touched
    workspace_bytes_ = bytes;
  }
  return workspace_->bytes();
}

layer_setup& tensors::layer(method how) {
  std::unique_ptr<layer_setup>& slot = layers_[how];
  if (!slot) slot = std::make_unique<layer_setup>(case_, how);
  return *slot;
}

std::size_t tensors::bytes() const {
  std::size_t floats = 0;
  const auto add = [&](const auto& v) { floats += v.size(); };
  for (const auto* v : {&x, &y, &dy, &dx, &mean, &var, &a, &centre, &b, &k}) add(*v);
  for (const auto& entry : layers_) {
    const layer_setup& L = *entry.second;
    const bkn::layer_storage<float>& st = L.storage;
    for (const auto* v : {&st.transition_weights, &st.dtransition_weights, &st.observed_mean,
                          &st.observed_cov, &st.predicted_mean, &st.predicted_cov,
                          &st.posterior_mean, &st.posterior_cov, &L.prior_mean, &L.prior_var,
                          &L.dprior_mean, &L.dprior_var})
      add(*v);
  }
  return floats * sizeof(float) + workspace_bytes_;
}

namespace {

/// Values keyed by name, most recently used first, freed from the back past a byte budget.
template <class V>
class lru_cache {
 public:
  template <class Make>
  V& get(const std::string& key, Make make) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->first != key) continue;
      entries_.splice(entries_.begin(), entries_, it);
      return *entries_.front().second;
    }
    entries_.emplace_front(key, make());
    shrink();
    return *entries_.front().second;
  }

 private:
  // Frees least recently used entries, never the front one, until all fit the budget.
  void shrink() {
    for (;;) {
      std::size_t total = 0;
      for (const auto& e : entries_) total += e.second->bytes();
      if (entries_.size() <= 1 || total <= cache_budget_bytes) return;
      entries_.pop_back();
    }
  }
  std::list<std::pair<std::string, std::unique_ptr<V>>> entries_;
};

}  // namespace

tensors& tensors_for(const shape_case& c) {
  static lru_cache<tensors> cache;
  return cache.get(c.name(), [&] { return std::make_unique<tensors>(c); });
}

void set_counters(benchmark::State& state, double bytes, index_t elements, int threads) {
  state.SetBytesProcessed(std::int64_t(bytes * double(state.iterations())));
  state.counters["elements"] = benchmark::Counter(double(elements));
  state.counters["threads"] = benchmark::Counter(double(threads));
}

// ---- checks of the peers' results ----

namespace {

// Relative to the size of the expected value, so one bound serves y (O(1)) and dx.
std::string compare(const char* what, const buffer& expected, const float* got) {
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double e = expected[i], d = std::abs(double(got[i]) - e);
    if (!(d <= 2e-3 * (1 + std::abs(e))))
      return std::string(what) + " differs from bkn's reference backend at element " +
             std::to_string(i) + ": expected " + std::to_string(e) + ", got " +
             std::to_string(got[i]);
  }
  return {};
}

// The BN layer's forward (and backward) on the reference backend, on copies of the inputs.
struct reference_bn {
  reference_bn(const shape_case& c, double epsilon)
      : t(tensors_for(c)), layer(config_of(c, method::bn)), y(t.x.size()), dx(t.x.size()) {
    opt.group_size = c.group_size;
    opt.epsilon = epsilon;
    ws = std::make_unique<bkn::host_workspace>(bkn::workspace_size(backend, opt, c.shape));
    x = t.x;
    dy = t.dy;
    bkn::forward(backend, opt, layer.view(), t.view(x), t.view(y), {}, ws->bytes());
  }
  void backward() {
    bkn::backward(backend, opt, layer.view(), t.view(x), t.view(dy), t.view(dx), {}, {},
                  ws->bytes());
  }
  tensors& t;
  bkn::reference_backend backend;
  bkn::options opt;
  bkn::layer_storage<float> layer;
  std::unique_ptr<bkn::host_workspace> ws;
  buffer x, dy, y, dx;
};

}  // namespace

std::string check_bn_forward(const shape_case& c, double epsilon, const float* y) {
  if (!c.small()) return {};
  const reference_bn r(c, epsilon);
  return compare("y", r.y, y);
}

std::string check_bn_backward(const shape_case& c, double epsilon, const float* dx) {
  if (!c.small()) return {};
  reference_bn r(c, epsilon);
  r.backward();
  return compare("dx", r.dx, dx);
}

float running_mean_of(index_t ch) { return channel_offset(ch); }
float running_var_of(index_t ch) {
  const float s = channel_scale(ch);
  return s * s / 3.0f;  // of offset + scale * U(-1, 1)
}

std::string check_bn_inference(const shape_case& c, double epsilon, const float* y) {
  if (!c.small()) return {};
  const tensors& t = tensors_for(c);
  const index_t C = c.channels(), S = c.shape.spatial();
  buffer expected(t.x.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const index_t ch = c.lay == layout::nchw ? (index_t(i) / S) % C : index_t(i) % C;
    expected[i] = float((double(t.x[i]) - running_mean_of(ch)) /
                        std::sqrt(double(running_var_of(ch)) + epsilon));
  }
  return compare("y", expected, y);
}

// ---- STREAM-like baselines ----

namespace {

struct stream_buffers {
  explicit stream_buffers(std::size_t n) : a(n, 0.0f), b(n, 1.0f), c(n, 2.0f) {}
  std::size_t bytes() const { return 3 * a.size() * sizeof(float); }
  buffer a, b, c;
};

stream_buffers& stream_buffers_for(const shape_case& c) {
  static lru_cache<stream_buffers> cache;
  return cache.get(c.shape_name(), [&] {
    return std::make_unique<stream_buffers>(
        std::size_t(std::max(copy_elements(c), triad_elements(c))));
  });
}

// copy: memcpy of n floats, 2n floats moved (STREAM's count: no write-allocate traffic).
void copy_benchmark(benchmark::State& state, const shape_case& c) {
  stream_buffers& s = stream_buffers_for(c);
  const index_t n = copy_elements(c);
  float* dst = s.a.data();
  const float* src = s.b.data();
  std::memcpy(dst, src, std::size_t(n) * sizeof(float));
  for (auto _ : state) {
    std::memcpy(dst, src, std::size_t(n) * sizeof(float));
    benchmark::DoNotOptimize(dst);
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * double(n) * sizeof(float), c.elements(), 1);
}

// triad: a = b + s c over n floats, 3n floats moved: the shape of backward's dx pass.
void triad_benchmark(benchmark::State& state, const shape_case& c) {
  stream_buffers& s = stream_buffers_for(c);
  const index_t n = triad_elements(c);
  float* __restrict a = s.a.data();
  const float* __restrict b = s.b.data();
  const float* __restrict cc = s.c.data();
  const float scalar = 3.0f;
  for (auto _ : state) {
    for (index_t i = 0; i < n; ++i) a[i] = b[i] + scalar * cc[i];
    benchmark::DoNotOptimize(a);
    benchmark::ClobberMemory();
  }
  set_counters(state, 3.0 * double(n) * sizeof(float), c.elements(), 1);
}

// read/<size>: OR of every 32-bit word of `bytes` (an integer reduction, which vectorizes with
// any floating-point flags), the same buffer again and again: the read bandwidth of the cache
// level or memory that holds a working set of that size.
void read_benchmark(benchmark::State& state, std::size_t bytes) {
  std::vector<std::uint32_t, aligned_allocator<std::uint32_t>> words(bytes / 4, 1u);
  const std::uint32_t* p = words.data();
  const std::size_t n = words.size();
  for (auto _ : state) {
    std::uint32_t acc = 0;
    for (std::size_t i = 0; i < n; ++i) acc |= p[i];
    benchmark::DoNotOptimize(acc);
  }
  set_counters(state, double(bytes), index_t(n), 1);
}

std::string size_name(std::size_t bytes) {
  return bytes >= (std::size_t(1) << 20) ? std::to_string(bytes >> 20) + "MiB"
                                          : std::to_string(bytes >> 10) + "KiB";
}

}  // namespace

void register_memory_sweep(const settings& s) {
  const std::size_t KiB = 1024, MiB = KiB * KiB;
  const std::vector<std::size_t> sizes =
      s.smoke ? std::vector<std::size_t>{32 * KiB, 1 * MiB}
              : std::vector<std::size_t>{32 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB,
                                         8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB, 256 * MiB};
  for (std::size_t bytes : sizes)
    benchmark::RegisterBenchmark(("read/" + size_name(bytes)).c_str(),
                                 [bytes](benchmark::State& st) { read_benchmark(st, bytes); })
        ->UseRealTime();
}

void register_baselines(const shape_case& c) {
  benchmark::RegisterBenchmark(("copy/" + c.shape_name()).c_str(),
                               [c](benchmark::State& s) { copy_benchmark(s, c); })
      ->UseRealTime();
  benchmark::RegisterBenchmark(("triad/" + c.shape_name()).c_str(),
                               [c](benchmark::State& s) { triad_benchmark(s, c); })
      ->UseRealTime();
}

}  // namespace bkn_bench
