// SPDX-License-Identifier: MIT
// libFuzzer target: one random normalized layer, forward then backward, on the reference and
// the Eigen backend (1 thread). See fuzz/README.md for the input format, the checks and how
// to reproduce a finding.
//
// The input decodes into a problem: a fixed header of kHeaderBytes decisions (shape, layouts,
// groups, options, transition, prior, which optional arrays are given, deliberate defects),
// then values. Every decision is one byte taken modulo its number of choices, and choice 0
// is the plain valid one, so a short input (missing bytes read as 0) is a small valid layer.
// Values come from the bytes after the header while they last (2 bytes per ordinary value;
// a first byte >= 0xE0 selects a special value: NaN, +-Inf, 1e30, denormals, a repeat of the
// previous value, ...), then from a PRNG seeded by header bytes 30-31.
//
// Checks, each a crash (abort) with a message on stderr:
//  - a call either returns or throws bkn::invalid_argument (or, with options.check_finite and
//    a NaN or Inf in x or dy, bkn::nonfinite_input); anything else is a bug;
//  - a call with a documented defect (negative stride, overlapping output, epsilon <= 0, a
//    group size not dividing N, a mismatched transition, ...) throws; a call without any
//    defect and without an unspecified feature (zero extents, an output layout that only
//    bkn's conservative overlap test can judge) returns;
//  - a call that throws leaves every output buffer bytewise unchanged, and no call ever
//    writes an input (x, dy, parameters, prior, dposterior) or outside its output views;
//  - both backends agree on whether each call throws;
//  - on a well-conditioned problem with finite inputs, both backends' outputs agree to 1e-8
//    relative to each output's largest magnitude, plus a share of its measured sensitivity
//    to rounding where it cancels (see `compare`);
//  - y has no NaN when every input is finite and every variance given is >= 0.
// ASan and UBSan (the build's -fsanitize flags) catch memory errors and undefined behaviour.

#include <bkn/backends/eigen.hpp>
#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace {

using bkn::index_t;
using vec = std::vector<double>;

bool verbose() {
  static const bool on = std::getenv("BKN_FUZZ_VERBOSE") != nullptr;
  return on;
}

/// With BKN_FUZZ_STATS set, what the inputs exercised is printed at exit: how many calls
/// returned or threw, and how many problems reached the comparison, per mode and transition.
struct statistics {
  long inputs = 0, fwd_returned = 0, fwd_invalid = 0, fwd_nonfinite = 0, bwd_returned = 0;
  long compared = 0, compared_full = 0, compared_prior = 0, compared_kind[5] = {};
  long nan_checked = 0;
  ~statistics() {
    if (!std::getenv("BKN_FUZZ_STATS") || inputs == 0) return;
    std::fprintf(stderr,
                 "bkn layer_fuzzer stats: %ld inputs; forward returned %ld, threw "
                 "invalid_argument %ld, nonfinite_input %ld; backward returned %ld; y checked "
                 "for NaN %ld; backends compared %ld (full mode %ld, with a prior %ld; "
                 "identity %ld, diagonal %ld, dense %ld, linear %ld, conv2d %ld)\n",
                 inputs, fwd_returned, fwd_invalid, fwd_nonfinite, bwd_returned, nan_checked,
                 compared, compared_full, compared_prior, compared_kind[0], compared_kind[1],
                 compared_kind[2], compared_kind[3], compared_kind[4]);
  }
};
statistics stats;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "\nbkn layer_fuzzer: CHECK FAILED: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- input decoding -------------------------------------------------------------------------

constexpr std::size_t kHeaderBytes = 32;

// Header byte positions (fuzz/README.md documents their choices).
enum header : std::size_t {
  kBatch, kChannels, kHeight, kWidth,           // 0-3
  kLayoutX, kLayoutY, kLayoutDy, kLayoutDx,     // 4-7
  kShapeDefect, kGroup, kMode, kTraining,       // 8-11
  kEpsilon, kMomentum, kFixedGain, kSkip,       // 12-15
  kFlags, kTransition, kTransitionDefect, kInChannels,  // 16-19
  kKernel, kStride, kPad, kPrior,               // 20-23
  kGain, kAffine, kNoise, kRunning,             // 24-27
  kGrads, kGradDefect, kSeedLo, kSeedHi,        // 28-31
};

class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {
    pos_ = std::min(size_, kHeaderBytes);
    state_ = 0x9E3779B97F4A7C15ull ^ (std::uint64_t(header_byte(kSeedLo)) |
                                      std::uint64_t(header_byte(kSeedHi)) << 8);
  }
  std::uint8_t header_byte(std::size_t i) const { return i < size_ ? data_[i] : 0; }
  unsigned choice(std::size_t i, unsigned count) const { return header_byte(i) % count; }
  /// The header byte's bits above the ones `choice(i, count)` consumed.
  unsigned high(std::size_t i, unsigned count) const { return header_byte(i) / count; }

  /// An extra byte from the tail (0 when exhausted), for decisions that need more room.
  std::uint8_t tail_byte() { return pos_ < size_ ? data_[pos_++] : 0; }

  /// The next value: from the tail bytes while they last, then from the PRNG.
  double value() {
    double v;
    if (pos_ < size_) {
      const unsigned b0 = data_[pos_++];
      if (b0 >= 0xE0) {
        v = special(b0 - 0xE0);
      } else {
        const unsigned b1 = pos_ < size_ ? data_[pos_++] : 0;
        // A grid of step 1/2048 over [-14, 14).
        v = (double(b0 << 8 | b1) - double(0x7000)) / 2048.0;
      }
    } else {
      // Irwin-Hall(4), centred: close to N(0, 1.33), every value distinct in practice.
      double s = 0;
      for (int i = 0; i < 4; ++i) s += double(next() >> 11) * 0x1.0p-53;
      v = 2 * (s - 2);
    }
    last_ = v;
    return v;
  }

 private:
  double special(unsigned k) {
    const double inf = std::numeric_limits<double>::infinity();
    switch (k) {
      case 0: return std::numeric_limits<double>::quiet_NaN();
      case 1: return inf;
      case 2: return -inf;
      case 3: return 1e30;
      case 4: return -1e30;
      case 5: return std::numeric_limits<double>::denorm_min();
      case 6: return -1e-310;  // denormal
      case 7: return 0.0;
      case 8: return -0.0;
      case 9: return 1e-30;
      case 13: return 1.0;
      case 14: return -1.0;
      case 15: return 1e15;
      case 16: return -1e-15;
      case 17: return 1e8;
      case 18: return 0.5;
      default: return last_;  // a repeat: constant channels, ties
    }
  }
  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  const std::uint8_t* data_;
  std::size_t size_, pos_;
  std::uint64_t state_;
  double last_ = 0.5;
};

// ---- validity model -------------------------------------------------------------------------

enum class expect { pass, fail, unknown };

/// What the docs say a call must do: a defect that is certainly checked makes it throw; with
/// none at all, and nothing unspecified, it returns.
struct verdict {
  bool defect = false;        // a certainly-checked defect: must throw
  bool maybe_defect = false;  // a defect that may not be checked, or an unspecified feature
  void must_throw(bool when) { defect = defect || when; }
  void unspecified(bool when) { maybe_defect = maybe_defect || when; }
  expect result() const {
    return defect ? expect::fail : maybe_defect ? expect::unknown : expect::pass;
  }
};

const char* name(expect e) {
  return e == expect::pass ? "must return" : e == expect::fail ? "must throw" : "either";
}

// ---- tensors --------------------------------------------------------------------------------

/// A tensor view into its own buffer, with a sentinel element before and after.
struct tensor_buffer {
  vec memory;
  index_t offset = 0;  // of the view's data pointer in memory
  bkn::tensor_shape shape{};
  bkn::tensor_strides strides{};
  bool input_ok = true;  // a valid read view
  int output_ok = 1;     // 1 a valid written view, 0 invalid (overlap), -1 unknown
  int kind = 0;

  bkn::tensor_view<double> view(vec& m) const { return {m.data() + offset, shape, strides}; }
  std::vector<index_t> offsets() const {
    std::vector<index_t> out;
    for (index_t n = 0; n < shape.batch; ++n)
      for (index_t c = 0; c < shape.channels; ++c)
        for (index_t h = 0; h < shape.height; ++h)
          for (index_t w = 0; w < shape.width; ++w)
            out.push_back(offset + n * strides.batch + c * strides.channel + h * strides.height +
                          w * strides.width);
    return out;
  }
};

const char* layout_name(int kind) {
  static const char* names[] = {"NCHW",       "NHWC",          "padded NCHW",
                                "permuted",   "padded permuted", "zero stride",
                                "negative stride", "random strides"};
  return names[kind & 7];
}

/// Builds a layout of `kind` (0-7) for `shape`; `param` and the tail bytes pick its details.
tensor_buffer make_tensor(const bkn::tensor_shape& shape, int kind, unsigned param,
                          reader& in) {
  tensor_buffer t;
  t.shape = shape;
  t.kind = kind;
  const index_t extent[4] = {shape.batch, shape.channels, shape.height, shape.width};
  index_t stride[4] = {0, 0, 0, 0};
  int order[4] = {0, 1, 2, 3};  // outermost first
  index_t pad[4] = {0, 0, 0, 0};
  if (kind == 1) {
    const int nhwc[4] = {0, 2, 3, 1};
    std::copy(nhwc, nhwc + 4, order);
  }
  if (kind == 3 || kind == 4) {
    for (unsigned k = param % 24, i = 0; i < 4; ++i) {  // the k-th permutation
      const unsigned f[4] = {6, 2, 1, 1};
      const unsigned j = k / f[i];
      k %= f[i];
      std::rotate(order + i, order + i + j, order + i + j + 1);
    }
  }
  if (kind == 2 || kind == 4) {
    for (int i = 0; i < 4; ++i) pad[i] = (param >> (2 * i)) & 3;
  }
  index_t span = 1;
  for (int i = 3; i >= 0; --i) {
    const int axis = order[i];
    stride[axis] = span;
    span *= extent[axis] + pad[axis];
  }
  if (kind == 5) stride[param % 4] = 0;
  if (kind == 6) stride[param % 4] = -std::max<index_t>(stride[param % 4], 1);
  if (kind == 7)
    for (auto& s : stride) s = in.tail_byte() % 8;
  t.strides = {stride[0], stride[1], stride[2], stride[3]};

  // The view's lowest and highest offsets, so the buffer holds it exactly (plus sentinels).
  index_t low = 0, high = 0;
  const bool empty = shape.elements() == 0;
  for (int i = 0; i < 4 && !empty; ++i) {
    const index_t reach = stride[i] * (extent[i] - 1);
    (reach < 0 ? low : high) += reach;
  }
  t.offset = 1 - low;
  t.memory.assign(std::size_t(high - low + 3), 0.0);

  const bool negative = kind == 6;
  t.input_ok = !negative;
  if (negative) {
    t.output_ok = 0;
  } else {
    std::vector<index_t> o = t.offsets();
    std::sort(o.begin(), o.end());
    const bool overlap = std::adjacent_find(o.begin(), o.end()) != o.end();
    // bkn's overlap test is a sufficient condition for distinct addresses: the nested layouts
    // (0-5) pass it whenever their addresses are distinct; random strides only when they
    // overlap are certainly rejected.
    t.output_ok = overlap ? 0 : kind == 7 ? -1 : 1;
  }
  return t;
}

bool finite_view(const tensor_buffer& t, const vec& memory) {
  for (index_t o : t.offsets())
    if (!std::isfinite(memory[std::size_t(o)])) return false;
  return true;
}

void fill(tensor_buffer& t, reader& in) {
  for (auto& v : t.memory) v = -7.25;  // sentinel and padding
  for (index_t o : t.offsets()) t.memory[std::size_t(o)] = in.value();
}

// ---- the problem ----------------------------------------------------------------------------

/// The host's own activation moments, for activation::custom: f(z) = z / 2.
bkn::math::activation_moments half_moments(double mu, double v) {
  return {0.5 * mu, 0.25 * v, 0.5, 0.0, 0.0, 0.25};
}

/// Every buffer of one run. Copied per backend, so both start from the same bytes.
struct buffers {
  // y and dx may be views into another tensor's memory: y_alias 1 = exactly x, 2 = x shifted
  // by one element; dx_alias 1 = exactly dy, 2 = exactly x, 3 = dy shifted by one element.
  // An aliased tensor_buffer keeps only the view (its own memory stays empty).
  tensor_buffer x, y, dy, dx;
  int y_alias = 0, dx_alias = 0;
  vec& y_memory() { return y_alias ? x.memory : y.memory; }
  vec& dx_memory() { return dx_alias == 2 ? x.memory : dx_alias ? dy.memory : dx.memory; }
  const vec& y_memory() const { return y_alias ? x.memory : y.memory; }
  const vec& dx_memory() const {
    return dx_alias == 2 ? x.memory : dx_alias ? dy.memory : dx.memory;
  }
  vec gamma, beta, gain, weights, bias, noise;
  vec dgamma, dbeta, dgain, dweights, dbias, dnoise;
  vec running_mean, running_var, skipped;
  vec obs_mean, obs_cov, pred_mean, pred_cov, post_mean, post_cov, dpost_mean, dpost_cov;
  vec prior_mean, prior_cov, dprior_mean, dprior_cov;
};

struct problem {
  buffers b;
  bkn::options opt;
  index_t N = 0, C = 0, H = 1, W = 1, G = 1, gs = 1;
  bkn::transition_kind kind = bkn::transition_kind::identity;
  index_t in_channels = 0;
  bkn::activation act = bkn::activation::none;
  bool custom_without_function = false;
  bool null_weights = false;
  bkn::conv2d_geometry conv{};
  // gaussian views' declared extents (the buffers' sizes may disagree: a defect)
  index_t state_groups = 0, state_channels = 0;
  index_t prior_groups = 0, prior_channels = 0, dprior_groups = 0, dprior_channels = 0;
  index_t dpost_groups = 0, dpost_channels = 0;
  bool transition_unsafe = false;  // a stride of 0: workspace_size must reject it
  bool options_bad = false;  // workspace_size must reject them
  int workspace_defect = 0;  // 0 none, 1 one byte short, 2 misaligned
  bool finite = true;        // every input value is finite
  bool sane = true;          // every variance given (prior, running) is >= 0, covariances PSD
  verdict fwd, bwd;
  std::string about;

  bkn::transition<double> transition(const buffers& s) const {
    const bkn::span<const double> w(null_weights ? nullptr : s.weights.data(),
                                    index_t(s.weights.size()));
    const bkn::span<const double> bias(s.bias.data(), index_t(s.bias.size()));
    switch (kind) {
      case bkn::transition_kind::identity: return bkn::transition<double>::identity();
      case bkn::transition_kind::diagonal: return bkn::transition<double>::diagonal(w);
      case bkn::transition_kind::dense: return bkn::transition<double>::dense(w, in_channels);
      case bkn::transition_kind::weights:
        return bkn::transition<double>::conv2d(w, bias, in_channels, conv, act,
                                               act == bkn::activation::custom &&
                                                       !custom_without_function
                                                   ? &half_moments
                                                   : nullptr);
    }
    return {};
  }
};

template <class V>
bkn::span<V> span_of(std::vector<std::remove_const_t<V>>& v) {
  return {v.data(), index_t(v.size())};
}

bkn::layer<double> layer_of(const problem& p, buffers& s) {
  bkn::layer<double> L;
  L.params.gamma = span_of<const double>(s.gamma);
  L.params.beta = span_of<const double>(s.beta);
  L.params.gain_logit = span_of<const double>(s.gain);
  L.params.transition = p.transition(s);
  L.params.noise = span_of<const double>(s.noise);
  L.grads = {span_of<double>(s.dgamma),   span_of<double>(s.dbeta), span_of<double>(s.dgain),
             span_of<double>(s.dnoise),   span_of<double>(s.dweights),
             span_of<double>(s.dbias)};
  L.running.mean = span_of<double>(s.running_mean);
  L.running.var = span_of<double>(s.running_var);
  L.running.skipped = span_of<double>(s.skipped);
  const index_t SG = p.state_groups, SC = p.state_channels;
  L.state.observed = {span_of<double>(s.obs_mean), span_of<double>(s.obs_cov), SG, SC};
  L.state.predicted = {span_of<double>(s.pred_mean), span_of<double>(s.pred_cov), SG, SC};
  L.state.posterior = {span_of<double>(s.post_mean), span_of<double>(s.post_cov), SG, SC};
  L.state.dposterior = {span_of<double>(s.dpost_mean), span_of<double>(s.dpost_cov),
                        p.dpost_groups, p.dpost_channels};
  return L;
}

double pick_table(const double* table, std::size_t n, unsigned b) { return table[b % n]; }

void add(std::string& s, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void add(std::string& s, const char* fmt, ...) {
  char line[256];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(line, sizeof line, fmt, args);
  va_end(args);
  s += line;
}

problem decode(const std::uint8_t* data, std::size_t size) {
  reader in(data, size);
  problem p;
  verdict& F = p.fwd;
  verdict& B = p.bwd;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();

  // Shape.
  {
    const index_t batch[] = {4, 1, 2, 3, 5, 6, 0}, channels[] = {3, 1, 2, 4, 5, 6};
    const index_t pixels[] = {2, 1, 3, 4};
    p.N = batch[in.choice(kBatch, 7)];
    p.C = channels[in.choice(kChannels, 6)];
    p.H = pixels[in.choice(kHeight, 4)];
    p.W = pixels[in.choice(kWidth, 4)];
  }
  const unsigned shape_defect = in.choice(kShapeDefect, 16);
  if (shape_defect == 13) {  // zero-size: C = 0 or W = 0 (behaviour unspecified beyond N = 0)
    (in.high(kShapeDefect, 16) & 1 ? p.W : p.C) = 0;
  }
  const bkn::tensor_shape shape{p.N, p.C, p.H, p.W};
  const bool zero_size = shape.elements() == 0 && p.N > 0;
  F.unspecified(zero_size);
  B.unspecified(zero_size);
  const index_t m_spatial = p.H * p.W;

  // Options.
  bkn::options& opt = p.opt;
  switch (in.choice(kGroup, 8)) {
    case 0: opt.group_size = 0; break;
    case 1: opt.group_size = 1; break;
    case 2: opt.group_size = 2; break;
    case 3: opt.group_size = 3; break;
    case 4: opt.group_size = p.N; break;
    case 5: opt.group_size = p.N + 1; break;
    case 6: opt.group_size = -1; break;
    default: opt.group_size = 4; break;
  }
  opt.mode = in.choice(kMode, 3) == 2 ? bkn::covariance::full : bkn::covariance::diagonal;
  const bool full = opt.mode == bkn::covariance::full;
  switch (in.choice(kTraining, 4)) {
    case 2: opt.training = false; opt.inference = bkn::inference_statistics::running; break;
    case 3: opt.training = false; opt.inference = bkn::inference_statistics::chain; break;
    default: opt.training = true; break;
  }
  const bool batch_stats = opt.training || opt.inference == bkn::inference_statistics::chain;
  {
    const double eps[] = {1e-5, 1e-5, 1e-5, 1e-3, 1.0, 1e-12, 1e-300, inf,
                          0.0,  -1e-5, nan, 1e-5, 1e-5, 1e-5, 0.1, 1e-5};
    const double momentum[] = {0.1, 0.1, 0.1, 0.0, 1.0, 0.5, 0.1, 0.1,
                               -0.1, 1.5, nan, 0.1, 0.1, 0.1, 0.1, 0.1};
    const double fixed[] = {-1, -1, -1, -1, 0.1, 0.0, 1.0, -inf, 1.5, nan, -1, -1, 0.5, -1, -1, -1};
    const double skip[] = {0, 0, 0, 0, 100, 1, 1e-3, inf, -1, nan, 0, 0, 10, 0, 0, 0};
    opt.epsilon = pick_table(eps, 16, in.header_byte(kEpsilon));
    opt.momentum = pick_table(momentum, 16, in.header_byte(kMomentum));
    opt.fixed_gain = pick_table(fixed, 16, in.header_byte(kFixedGain));
    opt.skip_threshold = pick_table(skip, 16, in.header_byte(kSkip));
  }
  const unsigned flags = in.header_byte(kFlags);
  opt.unbiased_running_variance = !(flags & 1);
  const bool raw_variances = flags & 2;  // prior and running variances as drawn, maybe < 0
  opt.check_finite = flags & 4;
  const bool options_bad = !(opt.epsilon > 0) || !(opt.momentum >= 0 && opt.momentum <= 1) ||
                           opt.group_size < 0 || !(opt.fixed_gain <= 1) ||
                           !(opt.skip_threshold >= 0);
  F.must_throw(options_bad);
  B.must_throw(options_bad);

  // Groups. An invalid group size still gets buffers, sized as if it were 1 group.
  const bool group_bad = opt.group_size < 0 ||
                         (p.N > 0 && opt.group_size > 0 && p.N % opt.group_size != 0);
  p.gs = opt.group_size > 0 && !group_bad ? opt.group_size : std::max<index_t>(p.N, 1);
  p.G = p.N > 0 ? p.N / p.gs : 1;
  const index_t G = p.G, C = p.C;
  const bool live = p.N > 0;  // N = 0 returns after the options and views are checked
  F.must_throw(live && group_bad);
  B.must_throw(live && group_bad);
  const index_t m = p.gs * m_spatial;  // values per channel and group

  // Tensors.
  const unsigned lx = in.header_byte(kLayoutX);
  tensor_buffer& x = p.b.x;
  x = make_tensor(shape, int(lx % 8), lx / 8, in);
  // Choices 0-2: x's layout; 3: an alias (of x for y; for dx by the byte's high bits: dy,
  // x, or dy shifted); 4-11: layouts 0-7.
  auto other = [&](std::size_t at, bool can_alias, int& alias, const bkn::tensor_shape& s) {
    const unsigned b = in.header_byte(at), c = b % 12;
    if (c < 3) return make_tensor(s, x.kind, lx / 8, in);
    if (c == 3 && can_alias) {
      alias = at == kLayoutY ? 1 + int(b / 12 % 4 == 3) : 1 + int(b / 12 % 6 / 2);
      return tensor_buffer{};
    }
    return make_tensor(s, int((c - 4) % 8), b / 12, in);
  };
  bkn::tensor_shape y_shape = shape, d_shape = shape;
  if (shape_defect == 14) ++(in.high(kShapeDefect, 16) & 1 ? y_shape.height : y_shape.channels);
  if (shape_defect == 15) ++(in.high(kShapeDefect, 16) & 1 ? d_shape.width : d_shape.batch);
  int unused = 0;
  p.b.y = other(kLayoutY, y_shape == shape, p.b.y_alias, y_shape);
  p.b.dy = other(kLayoutDy, false, unused, d_shape);
  p.b.dx = other(kLayoutDx, d_shape == shape, p.b.dx_alias, shape);
  auto alias_of = [](const tensor_buffer& t, bool shifted) {
    tensor_buffer a = t;
    a.memory.clear();
    a.offset += shifted ? 1 : 0;
    return a;
  };
  if (p.b.y_alias) p.b.y = alias_of(x, p.b.y_alias == 2);
  if (p.b.dx_alias) p.b.dx = alias_of(p.b.dx_alias == 2 ? x : p.b.dy, p.b.dx_alias == 3);
  const tensor_buffer& yv = p.b.y;
  const tensor_buffer& dxv = p.b.dx;
  // An output may be exactly its input (y over x, dx over dy), never overlap it otherwise,
  // and dx never shares memory with x (docs/reliability.md, aliasing).
  const bool nonempty = shape.elements() > 0;
  // A view shifted by one element overlaps the original iff it spans more than one element.
  auto spans = [](const tensor_buffer& t) {
    const std::vector<index_t> o = t.offsets();
    return !o.empty() && *std::max_element(o.begin(), o.end()) > *std::min_element(o.begin(), o.end());
  };
  F.must_throw(!x.input_ok || yv.output_ok == 0 || y_shape != shape);
  F.must_throw(nonempty && p.b.y_alias == 2 && spans(x));
  F.unspecified(yv.output_ok < 0);
  B.must_throw(!x.input_ok || !p.b.dy.input_ok || dxv.output_ok == 0 || d_shape != shape);
  B.must_throw(nonempty && (p.b.dx_alias == 2 || (p.b.dx_alias == 3 && spans(p.b.dy))));
  B.unspecified(dxv.output_ok < 0);

  // Layer parameters.
  const unsigned affine = in.header_byte(kAffine);
  if (!(affine & 1)) p.b.gamma.resize(std::size_t(C));
  if (!(affine & 2)) p.b.beta.resize(std::size_t(C));
  const bool affine_bad = affine % 16 >= 14;
  if (affine_bad) (affine % 16 == 14 ? p.b.gamma : p.b.beta).resize(std::size_t(C + 1));

  // Transition.
  const unsigned tk = in.choice(kTransition, 8);
  const unsigned tdefect = in.choice(kTransitionDefect, 8);
  const unsigned tvariant = in.high(kTransitionDefect, 8);
  bool transition_bad = false;      // check_transition rejects it
  bool transition_unsafe = false;   // so invalid that computing its workspace is undefined
  p.in_channels = C;
  switch (tk) {
    case 0: p.kind = bkn::transition_kind::identity; break;
    case 1: p.kind = bkn::transition_kind::diagonal; break;
    case 2: p.kind = bkn::transition_kind::dense; break;
    default: p.kind = bkn::transition_kind::weights; break;
  }
  const bool weights_kind = p.kind == bkn::transition_kind::weights;
  if (p.kind == bkn::transition_kind::dense || weights_kind)
    p.in_channels = in.choice(kInChannels, 6) + 1;
  // 3 linear relu, 4 linear none, 5 conv relu, 6 conv none / custom, 7 linear custom
  if (weights_kind) {
    p.act = tk == 4 || (tk == 6 && !(in.high(kInChannels, 6) & 1)) ? bkn::activation::none
            : tk == 3 || tk == 5                                   ? bkn::activation::relu
                                                                   : bkn::activation::custom;
    if (tk == 5 || tk == 6) {
      // A convolution whose output is this layer's H x W: kernel 1-3, stride 1-2, padding
      // 0-2, and the input size that gives H x W.
      const unsigned kb = in.header_byte(kKernel), sb = in.header_byte(kStride),
                     pb = in.header_byte(kPad);
      auto axis = [](index_t out, unsigned k, unsigned s, unsigned pad, index_t& in_size,
                     index_t& kernel, index_t& stride, index_t& padding) {
        kernel = index_t(k % 3 + 1);
        stride = index_t(s % 2 + 1);
        padding = std::min<index_t>(index_t(pad % 3), kernel - 1);
        in_size = (out - 1) * stride + kernel - 2 * padding;
        while (in_size < 1) {  // too much padding for this output
          --padding;
          in_size += 2;
        }
      };
      axis(p.H, kb, sb, pb, p.conv.in_height, p.conv.kernel_height, p.conv.stride_height,
           p.conv.pad_height);
      axis(p.W, kb / 3, sb / 2, pb / 3, p.conv.in_width, p.conv.kernel_width,
           p.conv.stride_width, p.conv.pad_width);
    }
    // A linear layer (all ones) only fits a layer of 1 x 1 pixels.
    transition_bad = transition_bad || p.conv.out_height() != p.H || p.conv.out_width() != p.W;
  }
  const index_t Cin = p.in_channels;
  index_t weight_count = 0;
  switch (p.kind) {
    case bkn::transition_kind::identity: break;
    case bkn::transition_kind::diagonal: weight_count = C; break;
    case bkn::transition_kind::dense: weight_count = C * Cin; break;
    case bkn::transition_kind::weights: weight_count = C * Cin * p.conv.taps(); break;
  }
  p.b.weights.resize(std::size_t(weight_count));
  if (weights_kind && !(tvariant & 8)) p.b.bias.resize(std::size_t(C));
  if (tdefect == 6 && p.kind != bkn::transition_kind::identity) {
    transition_bad = true;
    switch (tvariant % 4) {
      case 0: p.b.weights.resize(std::size_t(weight_count + 1)); break;
      case 1: p.null_weights = true; break;
      case 2:
        if (weights_kind) p.b.bias.resize(std::size_t(C + 1));
        else p.b.weights.resize(std::size_t(weight_count > 0 ? weight_count - 1 : 1));
        break;
      default:
        if (weights_kind) {
          p.act = bkn::activation::custom;
          p.custom_without_function = true;
        } else {
          p.b.weights.clear();
        }
        break;
    }
  }
  if (tdefect == 7 && weights_kind) {
    transition_bad = true;
    switch (tvariant % 4) {
      case 0: ++p.conv.in_height; break;  // may still give H (stride 2): checked below
      case 1: p.conv.stride_width = 0; transition_unsafe = true; break;
      case 2: p.conv.kernel_height = p.conv.in_height + 2 * p.conv.pad_height + 1; break;
      default:  // more border classes than bkn supports
        p.conv.in_width = 40;
        p.conv.kernel_width = 33;
        p.conv.pad_width = 16;
        break;
    }
    if (tvariant % 4 == 0)
      transition_bad = p.conv.out_height() != p.H || p.conv.out_width() != p.W;
  }
  if (tdefect == 7 && p.kind == bkn::transition_kind::dense) {
    transition_bad = true;  // in_channels 0 with an empty matrix
    p.in_channels = 0;
    p.b.weights.clear();
  }
  const index_t prior_cin = p.kind == bkn::transition_kind::dense || weights_kind
                                ? p.in_channels
                                : C;
  const bool full_weights_bad =
      full && weights_kind &&
      !(p.act == bkn::activation::none && p.conv.taps() == 1 && p.conv.in_height == 1 &&
        p.conv.in_width == 1);

  // Prior: per group (0), shared (1), none (2), or defective (3).
  const unsigned pc = in.choice(kPrior, 4), pv = in.high(kPrior, 4);
  bool prior_bad = false;
  p.prior_groups = pc == 1 ? 1 : pc == 2 ? 0 : G;
  p.prior_channels = pc == 2 ? 0 : std::max<index_t>(prior_cin, 0);
  index_t prior_cov_size = p.prior_groups * bkn::covariance_elements(p.prior_channels, opt.mode);
  if (pc == 3) {
    prior_bad = true;
    switch (pv % 3) {
      case 0: p.prior_groups = G + 1; prior_cov_size = p.prior_groups * bkn::covariance_elements(p.prior_channels, opt.mode); break;
      case 1: ++p.prior_channels; prior_cov_size = p.prior_groups * bkn::covariance_elements(p.prior_channels, opt.mode); break;
      default: ++prior_cov_size; break;
    }
  }
  const bool has_prior = p.prior_groups > 0;
  p.b.prior_mean.resize(std::size_t(p.prior_groups * p.prior_channels));
  p.b.prior_cov.resize(std::size_t(prior_cov_size));

  // Gains: per layer (0), per channel (1), none (2), too many (3).
  const unsigned gc = in.choice(kGain, 4);
  const index_t gain_count = gc == 0 ? 1 : gc == 1 ? C : gc == 2 ? 0 : C + 1;
  p.b.gain.resize(std::size_t(gain_count));
  const bool gain_bad = !(opt.fixed_gain >= 0 && gain_count == 0) &&
                        (full ? gain_count != 1 : gain_count != 1 && gain_count != C);
  const unsigned nc = in.choice(kNoise, 4);
  p.b.noise.resize(std::size_t(nc == 1 ? 0 : nc == 3 ? C + 1 : C));
  const bool noise_bad = nc == 3;

  // Running statistics: both (0, 2), none (1), defective (3).
  const unsigned rc = in.choice(kRunning, 4);
  bool running_bad = false;
  if (rc != 1) {
    p.b.running_mean.resize(std::size_t(C));
    p.b.running_var.resize(std::size_t(C));
  }
  if (rc == 3) {
    running_bad = true;  // (and maybe skipped, below)
    if (in.high(kRunning, 4) & 1) p.b.running_var.clear();
    else p.b.running_mean.resize(std::size_t(C + 1));
  }
  const bool running_missing = p.b.running_mean.empty() && p.b.running_var.empty();
  // Counts of skipped updates: given (high bit clear) or not; the wrong size is a defect.
  if (!(in.high(kRunning, 4) & 2)) p.b.skipped.resize(std::size_t(C));
  if (rc == 3 && in.high(kRunning, 4) & 4) p.b.skipped.resize(std::size_t(C + 2));

  // States (observed, predicted, posterior), sized for G groups of C channels.
  const unsigned gd = in.choice(kGradDefect, 16), gdv = in.high(kGradDefect, 16);
  p.state_groups = G;
  p.state_channels = C;
  const index_t cov = bkn::covariance_elements(C, opt.mode);
  bool state_bad = false;
  for (vec* v : {&p.b.obs_mean, &p.b.pred_mean, &p.b.post_mean}) v->resize(std::size_t(G * C));
  for (vec* v : {&p.b.obs_cov, &p.b.pred_cov, &p.b.post_cov}) v->resize(std::size_t(G * cov));
  if (gd == 10) {  // a state sized for the other mode, or for one group too many
    state_bad = true;
    if (gdv & 1) p.state_groups = G + 1;
    else p.b.post_cov.resize(std::size_t(G * bkn::covariance_elements(C, full ? bkn::covariance::diagonal : bkn::covariance::full)) + (C == 1 ? 1 : 0));
  }

  // Gradients: each given unless its bit in kGrads is set; kGradDefect breaks one.
  const unsigned gm = in.header_byte(kGrads);
  bool grads_bad = false;
  auto grad = [&](vec& g, index_t count, unsigned bit) {
    if (!(gm & (1u << bit))) g.resize(std::size_t(count));
  };
  grad(p.b.dgamma, C, 0);
  grad(p.b.dbeta, C, 1);
  grad(p.b.dgain, gain_count, 2);
  grad(p.b.dnoise, index_t(p.b.noise.size()), 3);
  grad(p.b.dweights, index_t(p.b.weights.size()), 4);
  if (weights_kind) grad(p.b.dbias, C, 5);
  switch (gd) {
    case 11: p.b.dgamma.resize(std::size_t(C + 1)); grads_bad = true; break;
    case 12: p.b.dgain.resize(std::size_t(gain_count + 1)); grads_bad = true; break;
    case 13: p.b.dnoise.resize(p.b.noise.size() + 1); grads_bad = true; break;
    case 14:
      p.b.dweights.resize(std::size_t(weight_count + 1));
      grads_bad = true;
      break;
    case 15:  // a bias gradient for a transition without a bias, or of the wrong size
      p.b.dbias.resize(std::size_t(weights_kind ? C + 1 : 1));
      grads_bad = true;
      break;
    default: break;
  }
  // dtransition's size is checked against the transition's weight count, not the buffer's.
  {
    const index_t expected =
        p.kind == bkn::transition_kind::identity ? 0
        : p.kind == bkn::transition_kind::diagonal ? C
        : p.kind == bkn::transition_kind::dense    ? C * p.in_channels
                                                   : C * p.in_channels * p.conv.taps();
    if (!p.b.dweights.empty() && index_t(p.b.dweights.size()) != expected) grads_bad = true;
  }

  // dprior (for a prior) and dposterior: given (bit 6, 7 clear) or not; defects 8, 9.
  p.dprior_groups = (gm & 64) || !has_prior ? 0 : p.prior_groups;
  p.dprior_channels = p.dprior_groups ? p.prior_channels : 0;
  p.b.dprior_mean.resize(std::size_t(p.dprior_groups * p.dprior_channels));
  p.b.dprior_cov.resize(p.dprior_groups ? std::size_t(prior_cov_size) : 0);
  bool dprior_bad = prior_bad && p.dprior_groups > 0 && pv % 3 == 2;  // cov size off
  if (gd == 8 && p.dprior_groups > 0) {
    dprior_bad = true;
    p.b.dprior_mean.push_back(0);
  }
  p.dpost_groups = (gm & 128) ? 0 : G;
  p.dpost_channels = p.dpost_groups ? C : 0;
  p.b.dpost_mean.resize(std::size_t(p.dpost_groups * C));
  p.b.dpost_cov.resize(std::size_t(p.dpost_groups * cov));
  bool dpost_bad = false;
  if (gd == 9 && p.dpost_groups > 0) {
    dpost_bad = true;
    p.dpost_channels = C + 1;
  }

  // Workspace: exact (0-5), one byte short (6), misaligned (7).
  {
    const unsigned w = in.choice(kSeedLo, 8);
    p.workspace_defect = w == 6 ? 1 : w == 7 ? 2 : 0;
  }

  // What each call must do (docs/api.md, and the checks each routine documents).
  const bool single = batch_stats && !has_prior && m == 1;
  for (verdict* v : {&F, &B}) {
    if (!live) break;
    v->must_throw(affine_bad || running_bad);
    v->must_throw(!batch_stats && running_missing);
    v->must_throw(state_bad || (batch_stats && single));
    v->must_throw(batch_stats && has_prior &&
                  (gain_bad || noise_bad || transition_bad || full_weights_bad || prior_bad));
    // Inference from running statistics checks no transition, but carves its workspace.
    v->unspecified(!batch_stats && has_prior && transition_bad);
    v->must_throw(p.workspace_defect != 0);
  }
  if (live) {
    B.must_throw(grads_bad || (dpost_bad && batch_stats) || (dprior_bad && has_prior));
    B.must_throw(transition_bad && (!p.b.dweights.empty() || !p.b.dbias.empty()));
    // d(transition bias) for a transition without one, however sized.
    B.must_throw(!weights_kind && !p.b.dbias.empty());
  }
  p.transition_unsafe = transition_unsafe;
  p.options_bad = options_bad;

  // Values, in a fixed order.
  fill(x, in);
  if (!p.b.y_alias) fill(p.b.y, in);
  fill(p.b.dy, in);
  if (!p.b.dx_alias) fill(p.b.dx, in);
  auto values = [&](vec& v, double scale = 1) {
    for (auto& e : v) e = scale * in.value();
  };
  auto variance = [&](double v) { return raw_variances ? v : v * v; };
  values(p.b.gamma);
  values(p.b.beta);
  values(p.b.gain);
  values(p.b.weights);
  values(p.b.bias);
  values(p.b.noise);
  values(p.b.running_mean);
  for (auto& e : p.b.skipped) e = double(in.tail_byte() % 4);
  for (auto& e : p.b.running_var) e = variance(in.value());
  values(p.b.prior_mean);
  if (!full) {
    for (auto& e : p.b.prior_cov) e = variance(in.value());
  } else {
    // Per prior group, L L^T + diag(d^2) from a lower-triangular L: positive semi-definite.
    const index_t K = p.prior_channels;
    for (std::size_t g0 = 0; g0 + std::size_t(K * K) <= p.b.prior_cov.size() && K > 0;
         g0 += std::size_t(K * K)) {
      vec L(std::size_t(K * K), 0.0);
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j <= i; ++j) L[std::size_t(i * K + j)] = in.value() * 0.5;
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < K; ++j) {
          double s = 0;
          for (index_t k = 0; k < K; ++k) s += L[std::size_t(i * K + k)] * L[std::size_t(j * K + k)];
          p.b.prior_cov[g0 + std::size_t(i * K + j)] = s;
        }
      for (index_t i = 0; i < K; ++i) {
        const double d = in.value();
        p.b.prior_cov[g0 + std::size_t(i * K + i)] += variance(d);
      }
    }
    for (std::size_t i = p.b.prior_cov.size() / std::size_t(std::max<index_t>(K * K, 1)) *
                         std::size_t(K * K);
         i < p.b.prior_cov.size(); ++i)
      p.b.prior_cov[i] = in.value();
  }
  values(p.b.dpost_mean, 0.25);
  values(p.b.dpost_cov, 0.25);
  // Outputs start as NaN: a read of an unwritten state or gradient shows in the results.
  for (vec* v : {&p.b.obs_mean, &p.b.obs_cov, &p.b.pred_mean, &p.b.pred_cov, &p.b.post_mean,
                 &p.b.post_cov, &p.b.dgamma, &p.b.dbeta, &p.b.dgain, &p.b.dnoise,
                 &p.b.dprior_mean, &p.b.dprior_cov})
    std::fill(v->begin(), v->end(), std::numeric_limits<double>::quiet_NaN());
  // The host's weight and bias gradients accumulate: they start from the host's values.
  values(p.b.dweights);
  values(p.b.dbias);
  if (!weights_kind) std::fill(p.b.dweights.begin(), p.b.dweights.end(), nan);

  // Finite and sane inputs (the NaN check and the comparison need them).
  auto all_finite = [](const vec& v) {
    return std::all_of(v.begin(), v.end(), [](double e) { return std::isfinite(e); });
  };
  p.finite = finite_view(x, x.memory) && finite_view(p.b.dy, p.b.dy.memory);
  for (const vec* v : {&p.b.gamma, &p.b.beta, &p.b.gain, &p.b.weights, &p.b.bias, &p.b.noise,
                       &p.b.running_mean, &p.b.running_var, &p.b.prior_mean, &p.b.prior_cov,
                       &p.b.dpost_mean, &p.b.dpost_cov})
    p.finite = p.finite && all_finite(*v);
  if (weights_kind) p.finite = p.finite && all_finite(p.b.dweights) && all_finite(p.b.dbias);
  p.sane = !raw_variances;

  if (verbose()) {
    std::string& s = p.about;
    add(s, "shape N=%lld C=%lld H=%lld W=%lld; groups of %lld (G=%lld, m=%lld)%s\n",
        (long long)p.N, (long long)p.C, (long long)p.H, (long long)p.W,
        (long long)opt.group_size, (long long)G, (long long)m, group_bad ? " INVALID" : "");
    add(s, "layouts x=%s y=%s dy=%s dx=%s%s%s; y shape %s, dy shape %s\n",
        layout_name(x.kind),
        p.b.y_alias == 1 ? "(x)" : p.b.y_alias == 2 ? "(x + 1)" : layout_name(p.b.y.kind),
        layout_name(p.b.dy.kind),
        p.b.dx_alias == 1   ? "(dy)"
        : p.b.dx_alias == 2 ? "(x)"
        : p.b.dx_alias == 3 ? "(dy + 1)"
                            : layout_name(p.b.dx.kind),
        yv.output_ok == 0 ? "; y overlaps" : "", dxv.output_ok == 0 ? "; dx overlaps" : "",
        y_shape == shape ? "ok" : "WRONG", d_shape == shape ? "ok" : "WRONG");
    add(s, "mode=%s training=%d inference=%s eps=%g momentum=%g fixed_gain=%g skip=%g "
        "unbiased=%d check_finite=%d raw_variances=%d\n",
        full ? "full" : "diagonal", int(opt.training),
        opt.inference == bkn::inference_statistics::chain ? "chain" : "running",
        opt.epsilon, opt.momentum, opt.fixed_gain, opt.skip_threshold,
        int(opt.unbiased_running_variance), int(opt.check_finite), int(raw_variances));
    add(s, "transition kind=%d act=%d Cin=%lld weights=%zu%s bias=%zu conv in %lldx%lld k "
        "%lldx%lld s %lldx%lld p %lldx%lld%s%s\n",
        int(p.kind), int(p.act), (long long)p.in_channels, p.b.weights.size(),
        p.null_weights ? " (null)" : "", p.b.bias.size(), (long long)p.conv.in_height,
        (long long)p.conv.in_width, (long long)p.conv.kernel_height,
        (long long)p.conv.kernel_width, (long long)p.conv.stride_height,
        (long long)p.conv.stride_width, (long long)p.conv.pad_height,
        (long long)p.conv.pad_width, transition_bad ? " INVALID" : "",
        full_weights_bad ? " (not in full mode)" : "");
    add(s, "prior groups=%lld channels=%lld cov=%zu%s; gains=%zu%s noise=%zu gamma=%zu "
        "beta=%zu running=%zu/%zu/%zu\n",
        (long long)p.prior_groups, (long long)p.prior_channels, p.b.prior_cov.size(),
        prior_bad ? " INVALID" : "", p.b.gain.size(), gain_bad ? " INVALID" : "",
        p.b.noise.size(), p.b.gamma.size(), p.b.beta.size(), p.b.running_mean.size(),
        p.b.running_var.size(), p.b.skipped.size());
    add(s, "grads dgamma=%zu dbeta=%zu dgain=%zu dnoise=%zu dweights=%zu dbias=%zu; dprior "
        "%lldx%lld, dposterior %lldx%lld; state groups %lld%s; workspace defect %d\n",
        p.b.dgamma.size(), p.b.dbeta.size(), p.b.dgain.size(), p.b.dnoise.size(),
        p.b.dweights.size(), p.b.dbias.size(), (long long)p.dprior_groups,
        (long long)p.dprior_channels, (long long)p.dpost_groups, (long long)p.dpost_channels,
        (long long)p.state_groups, state_bad ? " INVALID" : "", p.workspace_defect);
    add(s, "inputs finite=%d; forward %s, backward %s\n", int(p.finite), name(F.result()),
        name(B.result()));
  }
  return p;
}

// ---- running one backend --------------------------------------------------------------------

/// docs/api.md: an invalid_argument's routine() names the routine that rejected the call
/// (finding 3 of fuzz/README.md, fixed: a convolution rejected while carving the workspace
/// used to be reported as "bkn::workspace_size").
constexpr bool kCheckRoutineName = true;

struct outcome {
  enum kind { returned, invalid, nonfinite } result = returned;
  std::string what;
  bool threw() const { return result != returned; }
};

struct run_result {
  buffers after;
  outcome fwd, bwd;
};

/// A workspace allocated to its exact size (so ASan sees a pass that runs past it), filled
/// with NaN bytes before each call (so a read before a write shows).
struct workspace_buffer {
  struct deleter {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<std::byte[], deleter> memory;
  std::size_t allocated = 0;
  bkn::span<std::byte> bytes;

  workspace_buffer(std::size_t size, int defect) {
    allocated = std::max<std::size_t>(size + (defect == 2 ? 64 : 0), 1);
    memory.reset(static_cast<std::byte*>(::operator new[](allocated, std::align_val_t(64))));
    bytes = {memory.get() + (defect == 2 ? 8 : 0),
             index_t(defect == 1 && size > 0 ? size - 1 : size)};
  }
  void poison() { std::memset(memory.get(), 0xFF, allocated); }
};

/// The workspace for the call, from workspace_size, which must reject invalid options and a
/// convolution stride of 0 (fuzz/README.md, findings 1 and 2). When it rejects the arguments
/// the call fails before the workspace matters: any size does.
template <class Backend>
std::size_t workspace_bytes(const Backend& backend, const problem& p, const buffers& s) {
  const bool has_prior = p.prior_groups > 0;
  const auto A = has_prior ? p.transition(s) : bkn::transition<double>();
  try {
    const std::size_t n = bkn::workspace_size(backend, p.opt, {p.N, p.C, p.H, p.W}, A);
    // (Full mode needs no border classes, so it does not look at the geometry.)
    if (p.options_bad ||
        (p.transition_unsafe && has_prior && p.opt.mode == bkn::covariance::diagonal))
      fail("bkn::workspace_size accepted invalid options or a convolution stride of 0 and "
           "returned " + std::to_string(n));
    return n;
  } catch (const bkn::invalid_argument&) {
    return 4096;
  }
}

template <class Backend>
outcome call(const char* routine, const problem& p, buffers& s, bool backward_pass,
             const Backend& backend, workspace_buffer& ws) {
  outcome o;
  const bkn::layer<double> L = layer_of(p, s);
  const bkn::tensor_view<double> x = s.x.view(s.x.memory);
  const bkn::tensor_view<double> y = s.y.view(s.y_memory());
  const bkn::tensor_view<double> dy = s.dy.view(s.dy.memory);
  const bkn::tensor_view<double> dx = s.dx.view(s.dx_memory());
  const bkn::gaussian_view<const double> prior(span_of<const double>(s.prior_mean),
                                               span_of<const double>(s.prior_cov),
                                               p.prior_groups, p.prior_channels);
  const bkn::gaussian_view<double> dprior(span_of<double>(s.dprior_mean),
                                          span_of<double>(s.dprior_cov), p.dprior_groups,
                                          p.dprior_channels);
  try {
    if (!backward_pass)
      bkn::forward(backend, p.opt, L, bkn::tensor_view<const double>(x), y, prior, ws.bytes);
    else
      bkn::backward(backend, p.opt, L, bkn::tensor_view<const double>(x),
                    bkn::tensor_view<const double>(dy), dx, prior, dprior, ws.bytes);
  } catch (const bkn::invalid_argument& e) {
    o.result = outcome::invalid;
    o.what = e.what();
    if ((kCheckRoutineName || std::getenv("BKN_FUZZ_CHECK_ROUTINE")) &&
        std::strcmp(e.routine(), routine) != 0)
      fail(std::string(routine) + " threw an invalid_argument naming " + e.routine() + ": " +
           e.what());
  } catch (const bkn::nonfinite_input& e) {
    o.result = outcome::nonfinite;
    o.what = e.what();
  } catch (const std::exception& e) {
    fail(std::string(routine) + " threw something other than bkn::invalid_argument or "
         "bkn::nonfinite_input: " + e.what());
  } catch (...) {
    fail(std::string(routine) + " threw a non-std exception");
  }
  return o;
}

/// The buffers a routine may write (`written`) and those it must leave alone, in a fixed
/// order, so the lists of two copies of the buffers pair up element by element.
struct roles {
  std::vector<std::pair<const char*, const vec*>> written, untouched;
};

roles roles_of(const buffers& s, bool backward_pass) {
  const std::vector<std::pair<const char*, const vec*>> forward_outputs = {
      {"y", &s.y_memory()},
      {"running.mean", &s.running_mean},
      {"running.var", &s.running_var},
      {"running.skipped", &s.skipped},
      {"state.observed.mean", &s.obs_mean},
      {"state.observed.cov", &s.obs_cov},
      {"state.predicted.mean", &s.pred_mean},
      {"state.predicted.cov", &s.pred_cov},
      {"state.posterior.mean", &s.post_mean},
      {"state.posterior.cov", &s.post_cov}};
  const std::vector<std::pair<const char*, const vec*>> backward_outputs = {
      {"dx", &s.dx_memory()},
      {"grads.gamma", &s.dgamma},
      {"grads.beta", &s.dbeta},
      {"grads.gain_logit", &s.dgain},
      {"grads.noise", &s.dnoise},
      {"grads.transition", &s.dweights},
      {"grads.transition_bias", &s.dbias},
      {"dprior.mean", &s.dprior_mean},
      {"dprior.cov", &s.dprior_cov}};
  roles r;
  r.written = backward_pass ? backward_outputs : forward_outputs;
  r.untouched = {{"params.gamma", &s.gamma},
                 {"params.beta", &s.beta},
                 {"params.gain_logit", &s.gain},
                 {"params.transition", &s.weights},
                 {"params.transition.bias", &s.bias},
                 {"params.noise", &s.noise},
                 {"prior.mean", &s.prior_mean},
                 {"prior.cov", &s.prior_cov},
                 {"state.dposterior.mean", &s.dpost_mean},
                 {"state.dposterior.cov", &s.dpost_cov}};
  // The other routine's outputs, and the input tensors that are not this routine's output.
  const vec* out = backward_pass ? &s.dx_memory() : &s.y_memory();
  for (const auto& o : backward_pass ? forward_outputs : backward_outputs)
    if (o.second != out && o.second != &s.x.memory && o.second != &s.dy.memory)
      r.untouched.push_back(o);
  if (out != &s.x.memory) r.untouched.push_back({"x", &s.x.memory});
  if (out != &s.dy.memory) r.untouched.push_back({"dy", &s.dy.memory});
  return r;
}

bool same_bytes(const vec& a, const vec& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

/// The elements of a buffer outside its view must stay as they were.
void check_outside(const std::string& who, const char* name, const tensor_buffer& t,
                   const vec& before, const vec& after) {
  std::vector<bool> inside(before.size(), false);
  for (index_t o : t.offsets()) inside[std::size_t(o)] = true;
  for (std::size_t i = 0; i < before.size(); ++i)
    if (!inside[i] && std::memcmp(&before[i], &after[i], sizeof(double)) != 0)
      fail(who + " wrote " + name + "'s memory outside its view, at element " +
           std::to_string(i));
}

void perturb_states(const problem& p, buffers& s);

/// Forward then backward on `backend`, checking each call's outcome. With `perturb`, the
/// states forward wrote are perturbed before backward (see `perturbed`).
template <class Backend>
run_result run(const char* backend_name, const Backend& backend, const problem& p,
               bool perturb = false) {
  run_result r;
  r.after = p.b;
  buffers& s = r.after;
  const std::size_t bytes = workspace_bytes(backend, p, s);
  workspace_buffer ws(bytes, p.workspace_defect);

  for (bool backward_pass : {false, true}) {
    const char* routine = backward_pass ? "bkn::backward" : "bkn::forward";
    const buffers before = s;
    // A forward in place (y over x) leaves backward its output as x: ask the buffers.
    const bool nonfinite =
        p.opt.check_finite && p.N > 0 &&
        (!finite_view(s.x, s.x.memory) || (backward_pass && !finite_view(s.dy, s.dy.memory)));
    ws.poison();
    const outcome o = call(routine, p, s, backward_pass, backend, ws);
    const std::string who = std::string(backend_name) + " " + routine;
    const expect e = backward_pass ? p.bwd.result() : p.fwd.result();
    if (verbose())
      std::fprintf(stderr, "%s: %s%s\n", who.c_str(),
                   o.result == outcome::returned  ? "returned"
                   : o.result == outcome::invalid ? "threw invalid_argument: "
                                                  : "threw nonfinite_input: ",
                   o.what.c_str());
    if (e == expect::fail && o.result != outcome::invalid)
      fail(who + " did not reject a call with a documented defect" +
           (o.threw() ? ": it threw " + o.what : ""));
    if (e == expect::pass && o.result == outcome::invalid)
      fail(who + " rejected a valid call: " + o.what);
    if (e == expect::pass && nonfinite && o.result != outcome::nonfinite)
      fail(who + " with check_finite did not report a NaN or Inf input");
    if (o.result == outcome::nonfinite && !nonfinite)
      fail(who + " threw nonfinite_input without check_finite or a NaN/Inf input: " + o.what);

    const roles was = roles_of(before, backward_pass), is = roles_of(s, backward_pass);
    for (std::size_t i = 0; i < was.untouched.size(); ++i)
      if (!same_bytes(*was.untouched[i].second, *is.untouched[i].second))
        fail(who + " wrote " + was.untouched[i].first + ", which it must not write");
    if (o.threw()) {
      for (std::size_t i = 0; i < was.written.size(); ++i)
        if (!same_bytes(*was.written[i].second, *is.written[i].second))
          fail(who + " threw (" + o.what + ") but changed " + was.written[i].first);
    } else if (!backward_pass) {
      check_outside(who, "y", s.y, before.y_memory(), s.y_memory());
      if (!p.opt.training) {
        if (!same_bytes(before.running_mean, s.running_mean) ||
            !same_bytes(before.running_var, s.running_var) ||
            !same_bytes(before.skipped, s.skipped))
          fail(who + ": inference changed the moving averages");
      }
    } else {
      check_outside(who, "dx", s.dx, before.dx_memory(), s.dx_memory());
    }
    (backward_pass ? r.bwd : r.fwd) = o;
    if (perturb && !backward_pass && !o.threw()) perturb_states(p, s);
  }
  return r;
}

// ---- comparing backends ---------------------------------------------------------------------

std::vector<double> view_values(const tensor_buffer& t, const vec& memory) {
  std::vector<double> out;
  for (index_t o : t.offsets()) out.push_back(memory[std::size_t(o)]);
  return out;
}

/// The comparison of the backends, for double precision.
///
/// The backends differ only in the summation order of their reductions (moments, covariance,
/// sums over at most 6 * 4 * 4 = 96 values), each good to a few ulps relative to its sum of
/// magnitudes; the per-channel math is the same functors on both, and the elementwise passes
/// are the same operations up to FMA contraction. An output is then wrong by ~1e-16 times
/// its condition number, which the problem's well-conditioning (below) keeps under ~1e4
/// for y and the states: 1e-8 relative to each output's largest magnitude leaves a margin of
/// 1e4. A gradient can still be a sum that cancels (dy constant over a channel makes dgamma
/// exactly 0 in exact arithmetic: a zero stride in dy does it), so its rounding is measured:
/// `sensitivity` is how far the reference's output moves when x and dy move by kPerturbation
/// relative, and a difference of kRoundoff / kPerturbation of that is allowed on top. Rounding
/// acts like a relative perturbation of the summands of at most n u ~ 1e-14; kRoundoff = 1e-12
/// leaves a factor 100 for a random perturbation that underestimates the worst one.
constexpr double kTolerance = 1e-8;
constexpr double kPerturbation = 1e-11;
constexpr double kRoundoff = 1e-12;

double max_abs_diff(const vec& a, const vec& b) {
  double err = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (!std::isnan(a[i]) && !std::isnan(b[i]) && a[i] != b[i])
      err = std::max(err, std::abs(a[i] - b[i]));
  return err;
}

void compare(const char* name, const vec& a, const vec& b, const vec& perturbed) {
  if (a.size() != b.size()) fail(std::string(name) + ": sizes differ");
  double scale = 0, err = 0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i]))
      fail(std::string(name) + ": NaN on one backend only, at element " + std::to_string(i));
    if (std::isnan(a[i])) continue;
    scale = std::max({scale, std::abs(a[i]), std::abs(b[i])});
    const double d = a[i] == b[i] ? 0.0 : std::abs(a[i] - b[i]);
    if (d > err) {
      err = d;
      worst = i;
    }
  }
  const double sensitivity = max_abs_diff(a, perturbed);
  const double allowed = kTolerance * scale + kRoundoff / kPerturbation * sensitivity;
  if (verbose())
    std::fprintf(stderr, "compare %-22s max|diff| %.3g, scale %.3g, sensitivity %.3g\n", name,
                 err, scale, sensitivity);
  if (!(err <= allowed)) {
    char line[320];
    std::snprintf(line, sizeof line,
                  "%s: reference and eigen differ by %.3g (element %zu: %.17g vs %.17g); "
                  "allowed %.3g (1e-8 of the scale %.3g, plus %.0e of the sensitivity %.3g)",
                  name, err, worst, a[worst], b[worst], allowed, scale,
                  kRoundoff / kPerturbation, sensitivity);
    fail(line);
  }
}

/// A fixed sequence uniform in [-1, 1).
struct jitter {
  std::uint64_t state = 12345;
  double operator()() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return double(state >> 11) * 0x1.0p-52 - 1;
  }
};

/// The problem with x, dy and dposterior scaled by 1 + kPerturbation * r. Run with
/// perturb = true, which also moves the statistics forward wrote before backward reads them:
/// the reductions' rounding, which no perturbation of x reaches where an output cancels
/// exactly (sum (x - mean) is 0 for any x).
problem perturbed(const problem& p) {
  problem q = p;
  jitter r;
  for (index_t o : q.b.x.offsets()) q.b.x.memory[std::size_t(o)] *= 1 + kPerturbation * r();
  for (index_t o : q.b.dy.offsets()) q.b.dy.memory[std::size_t(o)] *= 1 + kPerturbation * r();
  for (vec* v : {&q.b.dpost_mean, &q.b.dpost_cov})
    for (auto& e : *v) e *= 1 + kPerturbation * r();
  return q;
}

/// Moves each (group, channel) statistic by kPerturbation times its summands' scale: a mean
/// by (|mean| + sigma), a (co)variance by (sigma_i sigma_j + |mean_i mean_j|).
void perturb_states(const problem& p, buffers& s) {
  jitter r;
  r.state = 777;
  const bool full = p.opt.mode == bkn::covariance::full;
  const index_t C = p.C, cov = bkn::covariance_elements(C, p.opt.mode);
  auto sd = [&](const vec& var, index_t g, index_t c) {
    const std::size_t d = std::size_t(full ? g * cov + c * (C + 1) : g * C + c);
    return d < var.size() ? std::sqrt(std::abs(var[d])) : 0.0;
  };
  for (auto [mean, var] : {std::pair<vec*, vec*>{&s.obs_mean, &s.obs_cov},
                           {&s.pred_mean, &s.pred_cov}, {&s.post_mean, &s.post_cov}}) {
    if (mean->size() != std::size_t(p.G * C) || var->size() != std::size_t(p.G * cov)) continue;
    const vec m0 = *mean, v0 = *var;
    for (index_t g = 0; g < p.G; ++g)
      for (index_t i = 0; i < C; ++i) {
        const std::size_t k = std::size_t(g * C + i);
        (*mean)[k] += kPerturbation * r() * (std::abs(m0[k]) + sd(v0, g, i));
        for (index_t j = 0; j < (full ? C : 1); ++j) {
          const index_t jj = full ? j : i;
          const std::size_t e = std::size_t(full ? g * cov + i * C + j : g * C + i);
          const double m = std::abs(m0[k] * m0[std::size_t(g * C + jj)]);
          (*var)[e] += kPerturbation * r() * (sd(v0, g, i) * sd(v0, g, jj) + m);
        }
      }
  }
}

bool well_conditioned(const problem& p, const buffers& ref) {
  if (!p.finite || !p.sane) return false;
  const bool batch_stats =
      p.opt.training || p.opt.inference == bkn::inference_statistics::chain;
  if (!batch_stats) return true;  // no reductions in forward; backward sums dy only
  if (p.gs * p.H * p.W < 2) return false;
  const bool full = p.opt.mode == bkn::covariance::full;
  for (index_t g = 0; g < p.G; ++g)
    for (index_t c = 0; c < p.C; ++c) {
      const double mean = ref.obs_mean[std::size_t(g * p.C + c)];
      const double var =
          ref.obs_cov[std::size_t(full ? (g * p.C + c) * p.C + c : g * p.C + c)];
      if (!(var >= 1e-3 * (mean * mean + 1))) return false;
    }
  return true;
}

void check_no_nan(const char* backend, const problem& p, const run_result& r) {
  if (!p.finite || !p.sane || r.fwd.threw()) return;
  ++stats.nan_checked;
  for (double v : view_values(r.after.y, r.after.y_memory()))
    if (std::isnan(v))
      fail(std::string(backend) + ": y has NaN although every input is finite");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const problem p = decode(data, size);
  if (verbose()) std::fprintf(stderr, "%s", p.about.c_str());

  const run_result ref = run("reference", bkn::reference_backend{}, p);
  const run_result eig = run("eigen", bkn::eigen_backend{1}, p);

  auto said = [](const outcome& o) {
    return o.threw() ? "threw (" + o.what + ")" : std::string("returned");
  };
  if (ref.fwd.result != eig.fwd.result || ref.bwd.result != eig.bwd.result)
    fail("the backends disagree on validity: forward on reference " + said(ref.fwd) +
         ", on eigen " + said(eig.fwd) + "; backward on reference " + said(ref.bwd) +
         ", on eigen " + said(eig.bwd));
  ++stats.inputs;
  stats.fwd_returned += ref.fwd.result == outcome::returned;
  stats.fwd_invalid += ref.fwd.result == outcome::invalid;
  stats.fwd_nonfinite += ref.fwd.result == outcome::nonfinite;
  stats.bwd_returned += ref.bwd.result == outcome::returned;
  check_no_nan("reference", p, ref);
  check_no_nan("eigen", p, eig);

  if (ref.fwd.threw() || ref.bwd.threw() || !well_conditioned(p, ref.after)) return 0;
  ++stats.compared;
  stats.compared_full += p.opt.mode == bkn::covariance::full;
  stats.compared_prior += p.prior_groups > 0;
  ++stats.compared_kind[p.kind != bkn::transition_kind::weights ? int(p.kind)
                        : p.conv.taps() == 1 && p.conv.in_height * p.conv.in_width == 1 ? 3
                                                                                       : 4];
  const run_result pert =
      run("reference (perturbed)", bkn::reference_backend{}, perturbed(p), true);
  const buffers& a = ref.after;
  const buffers& b = eig.after;
  const buffers& c = pert.after;
  compare("y", view_values(a.y, a.y_memory()), view_values(b.y, b.y_memory()),
          view_values(c.y, c.y_memory()));
  compare("dx", view_values(a.dx, a.dx_memory()), view_values(b.dx, b.dx_memory()),
          view_values(c.dx, c.dx_memory()));
  compare("grads.gamma", a.dgamma, b.dgamma, c.dgamma);
  compare("grads.beta", a.dbeta, b.dbeta, c.dbeta);
  compare("grads.gain_logit", a.dgain, b.dgain, c.dgain);
  compare("grads.noise", a.dnoise, b.dnoise, c.dnoise);
  compare("grads.transition", a.dweights, b.dweights, c.dweights);
  compare("grads.transition_bias", a.dbias, b.dbias, c.dbias);
  compare("dprior.mean", a.dprior_mean, b.dprior_mean, c.dprior_mean);
  compare("dprior.cov", a.dprior_cov, b.dprior_cov, c.dprior_cov);
  compare("running.mean", a.running_mean, b.running_mean, c.running_mean);
  compare("running.var", a.running_var, b.running_var, c.running_var);
  compare("running.skipped", a.skipped, b.skipped, c.skipped);
  compare("state.observed.mean", a.obs_mean, b.obs_mean, c.obs_mean);
  compare("state.observed.cov", a.obs_cov, b.obs_cov, c.obs_cov);
  compare("state.predicted.mean", a.pred_mean, b.pred_mean, c.pred_mean);
  compare("state.predicted.cov", a.pred_cov, b.pred_cov, c.pred_cov);
  compare("state.posterior.mean", a.post_mean, b.post_mean, c.post_mean);
  compare("state.posterior.cov", a.post_cov, b.post_cov, c.post_cov);
  return 0;
}
