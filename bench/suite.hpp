// SPDX-License-Identifier: MIT
// The benchmarks of one backend line (a backend value at one thread count), written once over
// the backend type: the four tensor kernels, and whole layers forward and backward.
#pragma once

#include <string>

#include "bench.hpp"

namespace bkn_bench {

/// A backend at one thread count, as the suite names and times it.
template <class Backend>
struct backend_line {
  std::string name;  ///< "eigen:t2": backend and threads, the benchmark name's second part
  Backend backend;
  int threads = 1;
  bool small_shapes_only = false;           ///< the reference backend: shape_case::small() only
  void (*fence)(const Backend&) = nullptr;  ///< waits for the passes (asynchronous backends)
};

namespace detail {

/// Times `op` on `line` (time_calls), with the line's fence after each call so that
/// asynchronous backends are timed to completion.
template <class Backend, class Setup, class Op>
void time_loop(benchmark::State& state, const backend_line<Backend>& line, double bytes,
               index_t elements, Setup&& setup, Op&& op) {
  const auto sync = [&] {
    if (line.fence) line.fence(line.backend);
  };
  time_calls(state, bytes, elements, line.threads, setup, op, sync, [] { return std::string(); });
}

template <class Backend>
void run(benchmark::State& state, const backend_line<Backend>& line, const shape_case& c,
         const benchmark_kind& kind) {
  using K = bkn::kernels<Backend>;
  using cspan = bkn::span<const float>;
  const Backend& be = line.backend;
  tensors& t = tensors_for(c);
  const bkn::tensor_view<float> y = t.view(t.y), dx = t.view(t.dx);
  const bkn::tensor_view<const float> x = t.view(t.x), dy = t.view(t.dy);
  const index_t gs = c.samples_per_group();
  const auto nothing = [] {};
  const auto timed = [&](auto&& setup, auto&& op) {
    time_loop(state, line, minimal_bytes(kind.what, c), c.elements(), setup, op);
  };
  bkn::options opt;
  opt.group_size = c.group_size;
  if (kind.how == method::bkn_full) opt.mode = bkn::covariance::full;

  switch (kind.what) {
    case op::moments: {
      const auto scratch =
          t.workspace(K::scratch_bytes(be, c.shape, gs, bkn::covariance::diagonal));
      const bkn::span<float> mean(t.mean), var(t.var);
      return timed(nothing, [&] { K::moments(be, x, gs, mean, var, scratch); });
    }
    case op::affine: {  // forward's normalize: y = a (x - centre) + k
      const cspan a(t.a), centre(t.centre), k(t.k);
      return timed(nothing, [&] {
        K::affine(be, y, x, a, centre, bkn::tensor_view<const float>(), cspan(), k, gs);
      });
    }
    case op::sums: {  // backward's reduction: sum dy, sum dy (x - centre)
      const auto scratch =
          t.workspace(K::scratch_bytes(be, c.shape, gs, bkn::covariance::diagonal));
      const cspan centre(t.centre);
      const bkn::span<float> sum_dy(t.mean), sum_dy_centred(t.var);
      return timed(nothing,
                   [&] { K::sums(be, dy, x, centre, gs, sum_dy, sum_dy_centred, scratch); });
    }
    case op::affine_v: {  // backward's dx, as bkn::backward calls it: b (x - mean) + a dy + k
      const cspan a(t.a), centre(t.centre), b(t.b), k(t.k);
      return timed(nothing, [&] { K::affine(be, dx, x, b, centre, dy, a, k, gs); });
    }
    case op::inference: {
      layer_setup& L = t.layer(method::bn);
      opt.training = false;
      const auto ws = t.workspace(bkn::workspace_size(be, opt, c.shape, L.transition()));
      return timed(nothing, [&] { bkn::forward(be, opt, L.layer, x, y, L.prior(), ws); });
    }
    case op::forward:
    case op::backward:
    case op::forward_backward: {
      layer_setup& L = t.layer(kind.how);
      const auto ws = t.workspace(bkn::workspace_size(be, opt, c.shape, L.transition()));
      const bkn::gaussian_view<const float> prior = L.prior();
      const bkn::gaussian_view<float> dprior = L.dprior();
      const auto forward = [&] { bkn::forward(be, opt, L.layer, x, y, prior, ws); };
      const auto backward = [&] { bkn::backward(be, opt, L.layer, x, dy, dx, prior, dprior, ws); };
      if (kind.what == op::forward) return timed(nothing, forward);
      if (kind.what == op::backward) return timed(forward, backward);  // state from a forward
      return timed(nothing, [&] {
        forward();
        backward();
      });
    }
  }
}

}  // namespace detail

/// Registers "<kind>/<line>/<case>", e.g. "forward_BKN-dense/eigen:t2/NHWC/32x64x56x56/gs=2".
template <class Backend>
void add(const backend_line<Backend>& line, const shape_case& c, const benchmark_kind& k) {
  if (line.small_shapes_only && !c.small()) return;
  const std::string name = kind_name(k) + "/" + line.name + "/" + c.name();
  benchmark::RegisterBenchmark(name.c_str(),
                               [line, c, k](benchmark::State& s) { detail::run(s, line, c, k); })
      ->UseRealTime();
}

}  // namespace bkn_bench
