// Tests of the host-side validation of bkn::forward and bkn::backward (forward.hpp,
// backward.hpp, error.hpp): each invalid argument throws bkn::invalid_argument naming the
// routine and the argument, what() states what was expected and what was given, and nothing
// the call could write (y / dx, the state, the gradients, the moving averages, d(prior)) has
// changed, byte for byte.
#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"

namespace {

using bkn::covariance;
using bkn::index_t;
using bkn::span;
using bkn::transition_kind;
using B = bkn::reference_backend;

struct spec {
  covariance mode = covariance::diagonal;
  transition_kind kind = transition_kind::identity;
  index_t in_channels = 0;  // C' of a dense or weights transition
  bool per_channel_gain = false;
  bkn::conv2d_geometry conv{};  // a weights transition's geometry
  bkn::activation act = bkn::activation::relu;
};

/// One valid forward/backward call (N = 4, C = 3, 2 x 1 images, 2 groups, with a prior of 2
/// groups) whose arguments the cases below spoil one at a time. Every array the routines may
/// write is filled with a sentinel byte pattern first.
template <class P>
struct fixture {
  static constexpr index_t N = 4, C = 3, H = 2, W = 1, G = 2;
  bkn::options opt;
  bkn::layer_storage<P> st;
  index_t Cin;
  std::vector<P> x, y, dy, dx, prior_mean, prior_cov, dprior_mean, dprior_cov, spare;
  bkn::host_workspace ws;

  // The call's arguments.
  bkn::layer<P> L;
  bkn::tensor_view<const P> xv, dyv;
  bkn::tensor_view<P> yv, dxv;
  bkn::gaussian_view<const P> prior;
  bkn::gaussian_view<P> dprior;
  span<std::byte> workspace;

  static bkn::layer_config config(const spec& s) {
    bkn::layer_config cfg;
    cfg.channels = C;
    cfg.groups = G;
    cfg.mode = s.mode;
    cfg.transition = s.kind;
    cfg.in_channels = s.in_channels;
    cfg.per_channel_gain = s.per_channel_gain;
    cfg.conv = s.conv;
    cfg.act = s.act;
    return cfg;
  }

  explicit fixture(const spec& s)
      : st(config(s)),
        Cin(s.in_channels > 0 ? s.in_channels : C),
        x(std::size_t(N * C * H * W)),
        y(x.size()),
        dy(x.size()),
        dx(x.size()),
        prior_mean(std::size_t(G * Cin)),
        prior_cov(std::size_t(G * bkn::covariance_elements(Cin, s.mode))),
        dprior_mean(prior_mean.size()),
        dprior_cov(prior_cov.size()),
        spare(4096),
        ws(bkn::workspace_size(B{}, make_options(s), {N, C, H, W}, st.view().params.transition)) {
    opt = make_options(s);
    std::mt19937 gen(1);
    std::uniform_real_distribution<double> u(-1, 1);
    for (auto* v : {&x, &dy, &prior_mean})
      for (auto& e : *v) e = P(u(gen));
    // Positive prior variances (diagonal in full mode).
    for (index_t g = 0; g < G; ++g)
      for (index_t k = 0; k < Cin; ++k) {
        if (s.mode == covariance::full)
          prior_cov[std::size_t((g * Cin + k) * Cin + k)] = P(1 + k);
        else
          prior_cov[std::size_t(g * Cin + k)] = P(1 + k);
      }
    for (auto* v : outputs())
      if (!v->empty()) std::memset(v->data(), 0x5A, v->size() * sizeof(P));
    L = st.view();
    xv = bkn::nchw(x.data(), N, C, H, W);
    dyv = bkn::nchw(dy.data(), N, C, H, W);
    yv = bkn::nchw(y.data(), N, C, H, W);
    dxv = bkn::nchw(dx.data(), N, C, H, W);
    prior = bkn::gaussian_view<const P>(
        span<const P>(prior_mean.data(), index_t(prior_mean.size())),
        span<const P>(prior_cov.data(), index_t(prior_cov.size())), G, Cin);
    dprior = bkn::gaussian_view<P>(dprior_mean, dprior_cov, G, Cin);
    workspace = ws.bytes();
  }
  fixture(const fixture&) = delete;
  fixture& operator=(const fixture&) = delete;

  static bkn::options make_options(const spec& s) {
    bkn::options o;
    o.mode = s.mode;
    o.group_size = N / G;
    return o;
  }

  /// Everything forward or backward may write (and dposterior, which they only read).
  /// Filled with the sentinel 0x5A bytes before the call.
  std::vector<std::vector<P>*> outputs() {
    return {&y,
            &dx,
            &dprior_mean,
            &dprior_cov,
            &st.observed_mean,
            &st.observed_cov,
            &st.predicted_mean,
            &st.predicted_cov,
            &st.posterior_mean,
            &st.posterior_cov,
            &st.dposterior_mean,
            &st.dposterior_cov,
            &st.dgamma,
            &st.dbeta,
            &st.dgain_logit,
            &st.dtransition_weights,
            &st.dtransition_bias,
            &st.dnoise,
            &st.running_mean,
            &st.running_var,
            &spare};  // spare backs the spoiled views of some cases
  }
  std::vector<std::vector<unsigned char>> snapshot() {
    std::vector<std::vector<unsigned char>> out;
    for (auto* v : outputs()) {
      std::vector<unsigned char> b(v->size() * sizeof(P));
      if (!b.empty()) std::memcpy(b.data(), v->data(), b.size());
      out.push_back(std::move(b));
    }
    return out;
  }

  void run(bool backward) {
    if (backward)
      bkn::backward(B{}, opt, L, xv, dyv, dxv, prior, dprior, workspace);
    else
      bkn::forward(B{}, opt, L, xv, yv, prior, workspace);
  }
};

struct expectation {
  const char* argument;
  std::vector<std::string> needles;  // substrings of what(): expected and got values
};

/// Applies `spoil` to a fresh fixture and checks the rejection by `routine` (forward or
/// backward, or both when both is true).
template <class P>
void check_rejected(const spec& s, bool backward, const std::function<void(fixture<P>&)>& spoil,
                    const expectation& expect) {
  fixture<P> f(s);
  spoil(f);
  const auto before = f.snapshot();
  const std::string routine = backward ? "bkn::backward" : "bkn::forward";
  const std::string argument = expect.argument;
  CAPTURE(routine);
  CAPTURE(argument);
  bool threw = false;
  try {
    f.run(backward);
  } catch (const bkn::invalid_argument& e) {
    threw = true;
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(std::string(e.routine()) == routine);
    CHECK(std::string(e.argument()) == expect.argument);
    CHECK(what.rfind(routine + ": " + expect.argument + ": ", 0) == 0);
    for (const auto& n : expect.needles) {
      CAPTURE(n);
      CHECK(what.find(n) != std::string::npos);
    }
  }
  CHECK(threw);
  const auto after = f.snapshot();
  for (std::size_t i = 0; i < after.size(); ++i) {
    CAPTURE(i);  // index into fixture::outputs()
    CHECK(after[i] == before[i]);
  }
}

template <class P>
void both(const spec& s, const std::function<void(fixture<P>&)>& spoil, const expectation& e) {
  check_rejected<P>(s, false, spoil, e);
  check_rejected<P>(s, true, spoil, e);
}

const spec diag_identity{};
const spec full_identity{covariance::full, transition_kind::identity, 0, false};
const spec diag_dense{covariance::diagonal, transition_kind::dense, 2, false};
const spec full_dense{covariance::full, transition_kind::dense, 5, false};
const spec diag_per_channel{covariance::diagonal, transition_kind::diagonal, 0, true};
// The host's 1 x 1 convolution from 2 channels on this layer's 2 x 1 images, through ReLU.
const spec diag_weights{covariance::diagonal,
                        transition_kind::weights,
                        2,
                        false,
                        bkn::conv2d_geometry{2, 1, 1, 1, 1, 1, 0, 0},
                        bkn::activation::relu};

}  // namespace

TEST_CASE_TEMPLATE("validation: the unspoiled calls succeed", P, float, double) {
  // The baseline of every case below is valid: each rejection is due to the one change.
  for (const spec& s :
       {diag_identity, full_identity, diag_dense, full_dense, diag_per_channel, diag_weights}) {
    fixture<P> f(s);
    CHECK_NOTHROW(f.run(false));
    CHECK_NOTHROW(f.run(true));
    f.L.running = {};  // moving averages are optional in training
    CHECK_NOTHROW(f.run(false));
    f.opt.training = false;
    f.L = f.st.view();
    CHECK_NOTHROW(f.run(false));
    CHECK_NOTHROW(f.run(true));
    f.opt.inference = bkn::inference_statistics::chain;
    CHECK_NOTHROW(f.run(false));
  }
}

TEST_CASE_TEMPLATE("validation: options", P, float, double) {
  using F = fixture<P>;
  both<P>(diag_identity, [](F& f) { f.opt.group_size = 3; },
          {"options.group_size", {"4", "got 3"}});
  both<P>(diag_identity, [](F& f) { f.opt.group_size = -2; },
          {"options.group_size", {">= 0", "got -2"}});
  both<P>(diag_identity, [](F& f) { f.opt.epsilon = 0; }, {"options.epsilon", {"> 0", "got 0"}});
  both<P>(diag_identity, [](F& f) { f.opt.epsilon = -1e-5; },
          {"options.epsilon", {"> 0", "got -1e-05"}});
  both<P>(diag_identity, [](F& f) { f.opt.momentum = -0.1; },
          {"options.momentum", {"[0, 1]", "got -0.1"}});
  both<P>(diag_identity, [](F& f) { f.opt.momentum = 1.5; },
          {"options.momentum", {"[0, 1]", "got 1.5"}});
  both<P>(diag_identity, [](F& f) { f.opt.fixed_gain = 1.25; },
          {"options.fixed_gain", {"[0, 1]", "got 1.25"}});
  both<P>(diag_identity, [](F& f) { f.opt.skip_threshold = -1; },
          {"options.skip_threshold", {">= 0", "got -1"}});
}

TEST_CASE_TEMPLATE("validation: parameters", P, float, double) {
  using F = fixture<P>;
  both<P>(diag_identity, [](F& f) { f.L.params.gamma = span<const P>(f.st.gamma.data(), 2); },
          {"params.gamma", {"3", "got 2"}});
  both<P>(diag_identity, [](F& f) { f.L.params.beta = span<const P>(f.spare.data(), 4); },
          {"params.beta", {"3", "got 4"}});
  // Full mode has one gain: C gains are rejected.
  both<P>(full_identity, [](F& f) { f.L.params.gain_logit = span<const P>(f.spare.data(), 3); },
          {"params.gain_logit", {"1", "got 3"}});
  // Diagonal mode: 1 or C gains, nothing else.
  both<P>(diag_identity, [](F& f) { f.L.params.gain_logit = span<const P>(f.spare.data(), 2); },
          {"params.gain_logit", {"got 2"}});
  both<P>(diag_identity, [](F& f) { f.L.params.gain_logit = span<const P>(); },
          {"params.gain_logit", {"got 0"}});
  both<P>(diag_identity, [](F& f) { f.L.params.noise = span<const P>(f.spare.data(), 1); },
          {"params.noise", {"3", "got 1"}});
  both<P>(diag_per_channel,
          [](F& f) {
            f.L.params.transition = bkn::transition<P>::diagonal(span<const P>(f.spare.data(), 2));
          },
          {"params.transition", {"3", "got 2"}});
  both<P>(diag_dense,
          [](F& f) {
            f.L.params.transition = bkn::transition<P>::dense(span<const P>(f.spare.data(), 5), 2);
          },
          {"params.transition", {"6", "got 5"}});
  // The host's layer: its output must be this layer's 2 x 1 images, its weights C x C' x kh x
  // kw, its bias C; full mode takes it only as a plain linear map.
  both<P>(diag_weights,
          [](F& f) {  // a linear layer: 1 x 1 outputs
            f.L.params.transition = bkn::transition<P>::linear(f.L.params.transition.weights,
                                                               f.L.params.transition.bias, 2);
          },
          {"params.transition", {"1x1", "2x1"}});
  both<P>(diag_weights,
          [](F& f) { f.L.params.transition.weights = span<const P>(f.spare.data(), 5); },
          {"params.transition", {"6", "got 5"}});
  both<P>(diag_weights, [](F& f) { f.L.params.transition.bias = span<const P>(f.spare.data(), 2); },
          {"params.transition.bias", {"3", "got 2"}});
  both<P>(diag_weights, [](F& f) { f.L.params.transition.act = bkn::activation::custom; },
          {"params.transition", {"moment_function"}});
  // Full mode with the same (ReLU, convolution) transition.
  both<P>(spec{covariance::full, transition_kind::weights, 2, false,
               bkn::conv2d_geometry{2, 1, 1, 1, 1, 1, 0, 0}, bkn::activation::relu},
          [](F&) {}, {"params.transition", {"full-covariance"}});
  check_rejected<P>(diag_weights, true,
                    [](F& f) { f.L.grads.transition_bias = span<P>(f.spare.data(), 2); },
                    {"grads.transition_bias", {"got 2"}});
  check_rejected<P>(diag_dense, true,
                    [](F& f) { f.L.grads.transition_bias = span<P>(f.spare.data(), 3); },
                    {"grads.transition_bias", {"none", "got 3"}});
}

TEST_CASE_TEMPLATE("validation: expected counts are stated as numbers", P,
                   float, double) {
  both<P>(diag_identity,
          [](fixture<P>& f) { f.L.params.gain_logit = span<const P>(f.spare.data(), 2); },
          {"params.gain_logit", {"3", "got 2"}});
  check_rejected<P>(diag_weights, true,
                    [](fixture<P>& f) { f.L.grads.transition_bias = span<P>(f.spare.data(), 2); },
                    {"grads.transition_bias", {"3", "got 2"}});
}

TEST_CASE_TEMPLATE("validation: the prior", P, float, double) {
  using F = fixture<P>;
  // A dense transition C x C' = 3 x 2 given a prior of 3 channels.
  both<P>(diag_dense,
          [](F& f) {
            f.prior = bkn::gaussian_view<const P>(span<const P>(f.spare.data(), 6),
                                                  span<const P>(f.spare.data() + 6, 6), 2, 3);
          },
          {"prior", {"2 channels", "got 2 groups of 3"}});
  both<P>(full_dense,
          [](F& f) {
            f.prior = bkn::gaussian_view<const P>(span<const P>(f.spare.data(), 8),
                                                  span<const P>(f.spare.data() + 8, 32), 2, 4);
          },
          {"prior", {"5 channels", "got 2 groups of 4"}});
  // The identity transition needs C' = C.
  both<P>(diag_identity,
          [](F& f) {
            f.prior = bkn::gaussian_view<const P>(span<const P>(f.spare.data(), 4),
                                                  span<const P>(f.spare.data() + 4, 4), 2, 2);
          },
          {"prior", {"3 channels", "got 2 groups of 2"}});
  // Three groups when the batch has two (1 or 2 are valid).
  both<P>(diag_identity,
          [](F& f) {
            f.prior = bkn::gaussian_view<const P>(span<const P>(f.spare.data(), 9),
                                                  span<const P>(f.spare.data() + 9, 9), 3, 3);
          },
          {"prior", {"2 groups", "got 3"}});
  // Right shape, wrong array sizes.
  both<P>(full_identity,
          [](F& f) {
            f.prior = bkn::gaussian_view<const P>(span<const P>(f.spare.data(), 6),
                                                  span<const P>(f.spare.data() + 6, 6), 2, 3);
          },
          {"prior", {"18", "got 6"}});
}

TEST_CASE_TEMPLATE("validation: state sizes", P, float, double) {
  using F = fixture<P>;
  both<P>(diag_identity,
          [](F& f) { f.L.state.observed.mean = f.L.state.observed.mean.subspan(0, 5); },
          {"state.observed", {"6", "got 5"}});
  both<P>(diag_identity, [](F& f) { f.L.state.posterior.cov = span<P>(f.spare.data(), 7); },
          {"state.posterior", {"6", "got 7"}});
  both<P>(full_identity, [](F& f) { f.L.state.predicted.cov = span<P>(f.spare.data(), 6); },
          {"state.predicted", {"18", "got 6"}});
  both<P>(diag_identity, [](F& f) { f.L.state.observed = {}; },
          {"state.observed", {"2 groups of 3 channels", "got 0 groups"}});
  both<P>(diag_identity,
          [](F& f) {
            f.L.state.posterior = bkn::gaussian_view<P>(span<P>(f.spare.data(), 3),
                                                        span<P>(f.spare.data() + 3, 3), 1, 3);
          },
          {"state.posterior", {"2 groups", "got 1 groups"}});
  // The moving averages: optional, but both or neither, C each.
  both<P>(diag_identity, [](F& f) { f.L.running.var = span<P>(f.spare.data(), 2); },
          {"running.var", {"3", "got 2"}});
  both<P>(diag_identity, [](F& f) { f.L.running.var = span<P>(); }, {"running", {"mean and var"}});
  // Backward only: the gradient from the next layer, the prior's gradient, the gradients.
  check_rejected<P>(diag_identity, true,
                    [](F& f) { f.L.state.dposterior.mean = span<P>(f.spare.data(), 4); },
                    {"state.dposterior", {"6", "got 4"}});
  check_rejected<P>(diag_identity, true, [](F& f) { f.dprior.cov = span<P>(f.spare.data(), 5); },
                    {"dprior", {"6", "got 5"}});
  check_rejected<P>(diag_identity, true, [](F& f) { f.L.grads.gamma = span<P>(f.spare.data(), 2); },
                    {"grads.gamma", {"3", "got 2"}});
  check_rejected<P>(diag_identity, true, [](F& f) { f.L.grads.beta = span<P>(f.spare.data(), 4); },
                    {"grads.beta", {"3", "got 4"}});
  check_rejected<P>(diag_identity, true,
                    [](F& f) { f.L.grads.gain_logit = span<P>(f.spare.data(), 3); },
                    {"grads.gain_logit", {"1", "got 3"}});
  check_rejected<P>(diag_dense, true,
                    [](F& f) { f.L.grads.transition = span<P>(f.spare.data(), 3); },
                    {"grads.transition", {"6", "got 3"}});
  check_rejected<P>(diag_identity, true, [](F& f) { f.L.grads.noise = span<P>(f.spare.data(), 1); },
                    {"grads.noise", {"3", "got 1"}});
}

TEST_CASE_TEMPLATE("validation: workspace", P, float, double) {
  using F = fixture<P>;
  both<P>(diag_identity, [](F& f) { f.workspace = f.workspace.subspan(0, 64); },
          {"workspace", {"at least", "got 64"}});
  both<P>(full_dense, [](F& f) { f.workspace = span<std::byte>(); },
          {"workspace", {"at least", "got 0"}});
  both<P>(diag_identity, [](F& f) { f.workspace = f.workspace.subspan(8, f.workspace.size() - 8); },
          {"workspace", {"aligned", "64"}});
}

TEST_CASE_TEMPLATE("validation: a misaligned workspace states what was given",
                   P, float, double) {
  both<P>(diag_identity,
          [](fixture<P>& f) { f.workspace = f.workspace.subspan(8, f.workspace.size() - 8); },
          {"workspace", {"aligned", "got"}});
}

TEST_CASE_TEMPLATE("validation: tensors", P, float, double) {
  using F = fixture<P>;
  // Mismatched shapes.
  check_rejected<P>(diag_identity, false, [](F& f) { f.yv = bkn::nchw(f.y.data(), 4, 3, 1, 2); },
                    {"y", {"expected shape (4, 3, 2, 1)", "got (4, 3, 1, 2)"}});
  check_rejected<P>(diag_identity, true, [](F& f) { f.dyv = bkn::nchw(f.dy.data(), 2, 3, 2, 1); },
                    {"dy", {"expected shape (4, 3, 2, 1)", "got (2, 3, 2, 1)"}});
  check_rejected<P>(diag_identity, true, [](F& f) { f.dxv = bkn::nchw(f.dx.data(), 4, 2, 2, 1); },
                    {"dx", {"expected shape (4, 3, 2, 1)", "got (4, 2, 2, 1)"}});
  // A negative stride (x walking backwards from its last element).
  both<P>(
      diag_identity,
      [](F& f) {
        f.xv = bkn::strided(static_cast<const P*>(f.x.data() + 23), {4, 3, 2, 1}, {-6, -2, -1, 1});
      },
      {"x", {"non-negative", "got (-6, -2, -1, 1)"}});
  check_rejected<P>(
      diag_identity, true,
      [](F& f) {
        f.dyv = bkn::strided(static_cast<const P*>(f.dy.data() + 20), {4, 3, 2, 1}, {-6, 2, 1, 1});
      },
      {"dy", {"non-negative", "got (-6, 2, 1, 1)"}});
  // Null data.
  check_rejected<P>(diag_identity, false, [](F& f) { f.yv = bkn::nchw<P>(nullptr, 4, 3, 2, 1); },
                    {"y", {"null"}});
  // Outputs whose elements overlap (a zero stride).
  check_rejected<P>(diag_identity, false,
                    [](F& f) {
                      f.yv = bkn::strided(f.y.data(), {4, 3, 2, 1}, {0, 2, 1, 1});
                    },
                    {"y", {"overlap"}});
  check_rejected<P>(diag_identity, true,
                    [](F& f) {
                      f.dxv = bkn::strided(f.dx.data(), {4, 3, 2, 1}, {6, 2, 0, 1});
                    },
                    {"dx", {"overlap"}});
}

TEST_CASE_TEMPLATE("validation: inference from running statistics needs them", P, float, double) {
  both<P>(diag_identity,
          [](fixture<P>& f) {
            f.opt.training = false;
            f.L.running = {};
          },
          {"running", {"running.mean", "running.var"}});
  // ... and a posterior to fill, when given, must have the right size.
  check_rejected<P>(diag_identity, false,
                    [](fixture<P>& f) {
                      f.opt.training = false;
                      f.L.state.posterior.mean = span<P>(f.spare.data(), 5);
                    },
                    {"state.posterior", {"6", "got 5"}});
}

TEST_CASE_TEMPLATE("validation: m = 1 without a prior", P, float, double) {
  // Groups of one sample of 1 x 1 pixels: batch statistics carry no information.
  spec s;
  check_rejected<P>(s, false,
                    [](fixture<P>& f) {
                      f.opt.group_size = 1;
                      f.xv = bkn::nc(static_cast<const P*>(f.x.data()), 4, 3);
                      f.yv = bkn::nc(f.y.data(), 4, 3);
                      f.prior = {};
                      f.L.state.observed = bkn::gaussian_view<P>(
                          span<P>(f.spare.data(), 12), span<P>(f.spare.data() + 12, 12), 4, 3);
                      f.L.state.posterior = bkn::gaussian_view<P>(
                          span<P>(f.spare.data() + 24, 12), span<P>(f.spare.data() + 36, 12), 4, 3);
                    },
                    {"x", {"prior"}});
}

TEST_CASE("validation: a null workspace of nonzero size is an invalid argument, not a crash") {
  bkn::layer_config cfg;
  cfg.channels = 2;
  bkn::layer_storage<float> st(cfg);
  std::vector<float> x{1, 2, 3, 4}, y(4, -1.0f);
  try {
    bkn::forward(bkn::reference_backend{}, bkn::options{}, st.view(),
                 bkn::tensor_view<const float>(bkn::nc(x.data(), 2, 2)), bkn::nc(y.data(), 2, 2),
                 bkn::gaussian_view<const float>(), bkn::span<std::byte>(nullptr, 1 << 20));
    FAIL("no exception");
  } catch (const bkn::invalid_argument& e) {
    CHECK(std::string(e.argument()) == "workspace");
    CHECK(std::string(e.what()).find("null") != std::string::npos);
  }
  CHECK(y == std::vector<float>(4, -1.0f));
}

TEST_CASE("validation: workspace_size checks the options and a convolution's geometry") {
  const bkn::reference_backend b;
  bkn::options bad;
  bad.group_size = -2;
  CHECK_THROWS_AS(bkn::workspace_size(b, bad, {4, 3, 1, 1}), bkn::invalid_argument);
  bkn::conv2d_geometry g{5, 5, 3, 3, 0, 1, 1, 1};  // a stride of 0 would divide by zero
  const std::vector<double> w(3 * 2 * 9);
  const auto A = bkn::transition<double>::conv2d(w, {}, 2, g);
  try {
    (void)bkn::workspace_size(b, bkn::options{}, {4, 3, 5, 5}, A);
    FAIL("no exception");
  } catch (const bkn::invalid_argument& e) {
    CHECK(std::string(e.argument()) == "params.transition");
    CHECK(std::string(e.what()).find("stride 0x1") != std::string::npos);
  }
}

TEST_CASE("validation: an invalid convolution in running-statistics inference names forward") {
  bkn::options opt;
  opt.training = false;
  std::vector<double> w(1, 1.0), x(2, 1.0), y(2), mean(1, 0.0), var(1, 1.0), pm(1, 0.0), pv(1, 1.0);
  bkn::conv2d_geometry g;
  g.stride_width = 0;
  bkn::layer<double> L;
  L.params.transition = bkn::transition<double>::conv2d(w, {}, 1, g, bkn::activation::relu);
  L.running.mean = mean;
  L.running.var = var;
  bkn::host_workspace ws(1 << 16);
  try {
    bkn::forward(bkn::reference_backend{}, opt, L, bkn::nc(x.data(), 2, 1), bkn::nc(y.data(), 2, 1),
                 bkn::gaussian_view<const double>({pm.data(), 1}, {pv.data(), 1}, 1, 1), ws.bytes());
    FAIL("no exception");
  } catch (const bkn::invalid_argument& e) {
    CHECK(std::string(e.routine()) == "bkn::forward");
    CHECK(std::string(e.argument()) == "params.transition");
  }
}
