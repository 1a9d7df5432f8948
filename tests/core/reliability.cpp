// SPDX-License-Identifier: MIT
// The numerical and memory-safety policies of docs/reliability.md: non-finite inputs, the
// opt-in finite check, skipped moving-average updates, overlapping views, 64-bit offsets.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#include "support/large_offsets.hpp"

namespace {

using bkn::index_t;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct problem {
  static constexpr index_t N = 4, C = 3, H = 2, W = 2;
  bkn::layer_config cfg;
  bkn::layer_storage<float> st;
  std::vector<float> x, y, dy, dx;
  bkn::options opt;
  bkn::host_workspace ws;

  problem() : cfg(config()), st(cfg), x(N * C * H * W), y(x.size(), -9), dy(x.size()), dx(x.size(), -9),
              ws(bkn::workspace_size(bkn::reference_backend{}, options(), {N, C, H, W})) {
    opt = options();
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = float(std::sin(double(i)) * 2 + 1);
      dy[i] = float(std::cos(double(i)));
    }
  }
  static bkn::layer_config config() {
    bkn::layer_config c;
    c.channels = C;
    c.groups = 2;
    return c;
  }
  static bkn::options options() {
    bkn::options o;
    o.group_size = 2;
    return o;
  }
  float& at(std::vector<float>& v, index_t n, index_t c, index_t s) {
    return v[std::size_t((n * C + c) * H * W + s)];
  }
  void forward() {
    bkn::forward(bkn::reference_backend{}, opt, st.view(),
                 bkn::nchw<const float>(x.data(), N, C, H, W), bkn::nchw(y.data(), N, C, H, W),
                 {}, ws.bytes());
  }
  void backward() {
    bkn::backward(bkn::reference_backend{}, opt, st.view(),
                  bkn::nchw<const float>(x.data(), N, C, H, W),
                  bkn::nchw<const float>(dy.data(), N, C, H, W), bkn::nchw(dx.data(), N, C, H, W),
                  {}, {}, ws.bytes());
  }
};

template <class V>
bool same_bytes(const V& a, const V& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), a.size() * sizeof(typename V::value_type)) == 0;
}

}  // namespace

TEST_CASE("reliability: NaN propagates into its own channel and group only (diagonal mode)") {
  problem p;
  p.at(p.x, 1, 2, 3) = kNaN;  // sample 1 is in group 0; channel 2
  p.forward();
  for (index_t n = 0; n < problem::N; ++n)
    for (index_t c = 0; c < problem::C; ++c)
      for (index_t s = 0; s < problem::H * problem::W; ++s) {
        const bool poisoned = c == 2 && n < 2;
        CAPTURE(n);
        CAPTURE(c);
        CHECK(std::isnan(p.at(p.y, n, c, s)) == poisoned);
      }
}

TEST_CASE("reliability: a non-finite estimate skips its channel's moving averages, and counts it") {
  problem p;
  const std::vector<float> mean_before = p.st.running_mean, var_before = p.st.running_var;
  p.at(p.x, 3, 1, 0) = std::numeric_limits<float>::infinity();
  p.forward();
  CHECK(p.st.running_mean[1] == mean_before[1]);
  CHECK(p.st.running_var[1] == var_before[1]);
  CHECK(p.st.running_skipped == std::vector<float>{0, 1, 0});
  for (index_t c : {0, 2}) {
    CHECK(p.st.running_mean[std::size_t(c)] != mean_before[std::size_t(c)]);
    CHECK(std::isfinite(p.st.running_var[std::size_t(c)]));
  }
  p.at(p.x, 3, 1, 0) = 0.5f;
  p.forward();
  CHECK(p.st.running_skipped == std::vector<float>{0, 1, 0});  // a clean batch adds nothing
  CHECK(p.st.running_mean[1] != mean_before[1]);
}

TEST_CASE("reliability: an estimate beyond float's range skips its moving averages too") {
  // Channel 1 at +-f, half and half in each group of 8 values: mean 0, biased variance f^2 (a
  // float), unbiased f^2 8 / 7, finite in double: above FLT_MAX for f = 1.8e19, below it for
  // f = 1.6e19.
  problem p;
  p.opt.momentum = 0.5;
  const auto run = [&](float f) {
    for (index_t n = 0; n < problem::N; ++n)
      for (index_t s = 0; s < problem::H * problem::W; ++s)
        p.at(p.x, n, 1, s) = (n + s) % 2 ? f : -f;
    p.forward();
    return double(f) * double(f) * 8 / 7;
  };
  const std::vector<float> var_before = p.st.running_var;
  const double max = double(std::numeric_limits<float>::max());
  SUBCASE("beyond: skipped and counted") {
    REQUIRE(run(1.8e19f) > max);
    CHECK(p.st.running_var[1] == var_before[1]);
    CHECK(p.st.running_skipped == std::vector<float>{0, 1, 0});
  }
  SUBCASE("within: averaged") {
    const double unbiased = run(1.6e19f);
    REQUIRE(unbiased < max);
    const double expected = 0.5 * double(var_before[1]) + 0.5 * unbiased;
    CHECK(std::abs(double(p.st.running_var[1]) - expected) <= 1e-6 * expected);
    CHECK(p.st.running_skipped == std::vector<float>{0, 0, 0});
  }
}

TEST_CASE("reliability: the opt-in finite check names the first non-finite element, writes nothing") {
  problem p;
  p.opt.check_finite = true;
  p.at(p.x, 2, 1, 3) = kNaN;
  p.at(p.x, 3, 0, 0) = kNaN;  // later in (n, c, h, w) order
  const auto y0 = p.y;
  const auto running0 = p.st.running_mean;
  const auto observed0 = p.st.observed_mean;
  try {
    p.forward();
    FAIL("no exception");
  } catch (const bkn::nonfinite_input& e) {
    CHECK(std::string(e.routine()) == "bkn::forward");
    CHECK(std::string(e.argument()) == "x");
    CHECK(e.sample() == 2);
    CHECK(e.channel() == 1);
    CHECK(std::string(e.what()).find("(n, c, h, w) = (2, 1, 1, 1)") != std::string::npos);
  }
  CHECK(same_bytes(p.y, y0));
  CHECK(same_bytes(p.st.running_mean, running0));
  CHECK(same_bytes(p.st.observed_mean, observed0));

  // The same check guards backward's dy.
  p.at(p.x, 2, 1, 3) = 1;
  p.at(p.x, 3, 0, 0) = 1;
  p.forward();
  p.at(p.dy, 0, 2, 1) = -std::numeric_limits<float>::infinity();
  const auto dx0 = p.dx;
  try {
    p.backward();
    FAIL("no exception");
  } catch (const bkn::nonfinite_input& e) {
    CHECK(std::string(e.argument()) == "dy");
    CHECK(e.channel() == 2);
  }
  CHECK(same_bytes(p.dx, dx0));
  // Off, the same inputs run and the Inf reaches dx.
  p.opt.check_finite = false;
  p.backward();
  bool any_inf = false;
  for (float v : p.dx) any_inf = any_inf || !std::isfinite(v);
  CHECK(any_inf);
}

TEST_CASE("reliability: outputs may be their input's exact view, never a partial overlap") {
  problem p;
  const auto N = problem::N, C = problem::C, H = problem::H, W = problem::W;
  std::vector<float> buffer(p.x.size() + 4);
  std::copy(p.x.begin(), p.x.end(), buffer.begin());
  const auto x = bkn::nchw<const float>(buffer.data(), N, C, H, W);
  bkn::reference_backend b;
  // In place: allowed.
  CHECK_NOTHROW(bkn::forward(b, p.opt, p.st.view(), x, bkn::nchw(buffer.data(), N, C, H, W), {},
                             p.ws.bytes()));
  // Shifted by one element: the writes would feed later reads.
  const auto before = buffer;
  try {
    bkn::forward(b, p.opt, p.st.view(), x, bkn::nchw(buffer.data() + 1, N, C, H, W), {},
                 p.ws.bytes());
    FAIL("no exception");
  } catch (const bkn::invalid_argument& e) {
    CHECK(std::string(e.argument()) == "y");
    CHECK(std::string(e.what()).find("overlaps x") != std::string::npos);
  }
  CHECK(same_bytes(buffer, before));
  // backward: dx may be dy, never x.
  p.forward();
  std::vector<float> dy = p.dy;
  CHECK_NOTHROW(bkn::backward(b, p.opt, p.st.view(), bkn::nchw<const float>(p.x.data(), N, C, H, W),
                              bkn::nchw<const float>(dy.data(), N, C, H, W),
                              bkn::nchw(dy.data(), N, C, H, W), {}, {}, p.ws.bytes()));
  try {
    bkn::backward(b, p.opt, p.st.view(), bkn::nchw<const float>(p.x.data(), N, C, H, W),
                  bkn::nchw<const float>(p.dy.data(), N, C, H, W),
                  bkn::nchw(p.x.data(), N, C, H, W), {}, {}, p.ws.bytes());
    FAIL("no exception");
  } catch (const bkn::invalid_argument& e) {
    CHECK(std::string(e.argument()) == "dx");
    CHECK(std::string(e.what()).find("must not be the same memory as x") != std::string::npos);
  }
}

TEST_CASE("reliability: offsets beyond 2^31 elements, reference backend") {
  bkn_test::check_offsets_beyond_2_31(bkn::reference_backend{});
}
