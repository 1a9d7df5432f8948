// SPDX-License-Identifier: MIT
// Batch Kalman Normalization as a libtorch layer: an autograd Function that runs bkn on the
// tensors' own memory, and a Module that owns the parameters and the running statistics.
//
//   bkn_torch::BKN bn1(bkn_torch::BKNOptions(16).group_size(2));
//   bkn_torch::BKN bn2(bkn_torch::BKNOptions(16).group_size(2).through(conv2));
//   auto a = bn1(conv1(x));                                // a.y, a.posterior
//   auto b = bn2(conv2(torch::relu(a.y)), a.posterior);    // layer 1's posterior is the prior
//
// The posterior is an output of the autograd graph, so loss.backward() carries layer 2's
// d(prior) into layer 1's backward: the gradient flows along the chain (docs/embedding.md).
#pragma once

#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <bkn/backends/eigen.hpp>
#include <bkn/bkn.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace bkn_torch {

/// A layer's Kalman estimate of its channels, one per statistics group: `mean` (G, C) and `cov`
/// (G, C) in diagonal mode or (G, C, C) in full mode, over activations of height x width
/// pixels (which a convolution transition needs). Tensors of the autograd graph.
struct gaussian {
  torch::Tensor mean, cov;
  int64_t height = 1, width = 1;

  bool defined() const { return mean.defined(); }
  /// The same estimate cut from the graph: a constant prior that receives no gradient.
  gaussian detach() const { return {mean.detach(), cov.detach(), height, width}; }
};

/// What a BKN layer returns: the normalized tensor and its posterior, the next layer's prior.
struct output {
  torch::Tensor y;
  gaussian posterior;
};

/// The transition A that carries the previous layer's estimate to this layer (Eq. 3).
enum class transition_type { identity, diagonal, dense, linear, conv2d };

/// Options of a BKN layer, libtorch style: BKNOptions(64).group_size(2).through(conv).
struct BKNOptions {
  /* implicit */ BKNOptions(int64_t channels) : channels_(channels) {}  // NOLINT

  TORCH_ARG(int64_t, channels);
  /// Samples per statistics group (the paper's statistics-batch-size); 0: the whole batch.
  TORCH_ARG(int64_t, group_size) = 0;
  /// Per-channel variances (the default) or the paper's full covariance.
  TORCH_ARG(bkn::covariance, mode) = bkn::covariance::diagonal;
  TORCH_ARG(double, eps) = 1e-5;
  /// PyTorch's convention: running = (1 - momentum) running + momentum estimate.
  TORCH_ARG(double, momentum) = 0.1;
  /// One gain per channel (diagonal mode) instead of one per layer.
  TORCH_ARG(bool, per_channel_gain) = false;
  TORCH_ARG(double, initial_gain) = 0.5;
  /// The process noise R = softplus(noise) starts at this value.
  TORCH_ARG(double, initial_noise) = 0.01;
  /// In [0, 1]: q is this constant and the layer has no gain parameter; negative: learned.
  TORCH_ARG(double, fixed_gain) = -1;
  /// What eval() normalizes with: the running statistics or the chain's estimate.
  TORCH_ARG(bkn::inference_statistics, inference) = bkn::inference_statistics::running;

 public:
  /// A = diag(a), learned, C == C'.
  BKNOptions& diagonal() {
    transition_ = transition_type::diagonal;
    return *this;
  }
  /// A learned dense C x C' matrix from a previous layer of `in_channels` channels.
  BKNOptions& dense(int64_t in_channels) {
    transition_ = transition_type::dense;
    in_channels_ = in_channels;
    return *this;
  }
  /// The host's own Linear layer (after `act`) is the transition: its weight and bias get
  /// bkn's share of their gradient added to their own.
  BKNOptions& through(torch::nn::Linear layer, bkn::activation act = bkn::activation::relu) {
    transition_ = transition_type::linear;
    linear_ = std::move(layer);
    activation_ = act;
    return *this;
  }
  /// The same with the host's Conv2d (zero padding, no dilation or groups).
  BKNOptions& through(torch::nn::Conv2d layer, bkn::activation act = bkn::activation::relu) {
    transition_ = transition_type::conv2d;
    conv_ = std::move(layer);
    activation_ = act;
    return *this;
  }

  transition_type transition() const { return transition_; }
  int64_t in_channels() const { return in_channels_ > 0 ? in_channels_ : channels_; }
  const torch::nn::Linear& linear() const { return linear_; }
  const torch::nn::Conv2d& conv() const { return conv_; }
  bkn::activation activation() const { return activation_; }

 private:
  transition_type transition_ = transition_type::identity;
  int64_t in_channels_ = 0;
  torch::nn::Linear linear_{nullptr};
  torch::nn::Conv2d conv_{nullptr};
  bkn::activation activation_ = bkn::activation::relu;
};

namespace detail {

/// Everything a call needs besides tensors: the options, the transition's kind and geometry,
/// and the CPU threads. Saved in the autograd context as two lists, for backward.
struct call {
  bkn::options opt;
  bkn::transition_kind kind = bkn::transition_kind::identity;
  bkn::activation act = bkn::activation::none;
  bkn::conv2d_geometry conv{};
  int threads = 1;

  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["bkn.ints"] = std::vector<int64_t>{
        int64_t(opt.mode), opt.group_size, opt.training, int64_t(opt.inference),
        opt.unbiased_running_variance, opt.check_finite, int64_t(kind), int64_t(act),
        conv.in_height, conv.in_width, conv.kernel_height, conv.kernel_width,
        conv.stride_height, conv.stride_width, conv.pad_height, conv.pad_width, threads};
    ctx->saved_data["bkn.reals"] =
        std::vector<double>{opt.epsilon, opt.momentum, opt.fixed_gain, opt.skip_threshold};
  }
  static call load(torch::autograd::AutogradContext* ctx) {
    const std::vector<int64_t> i = ctx->saved_data["bkn.ints"].toIntVector();
    const std::vector<double> r = ctx->saved_data["bkn.reals"].toDoubleVector();
    call c;
    c.opt.mode = bkn::covariance(i[0]);
    c.opt.group_size = i[1];
    c.opt.training = i[2] != 0;
    c.opt.inference = bkn::inference_statistics(i[3]);
    c.opt.unbiased_running_variance = i[4] != 0;
    c.opt.check_finite = i[5] != 0;
    c.kind = bkn::transition_kind(i[6]);
    c.act = bkn::activation(i[7]);
    c.conv = {i[8], i[9], i[10], i[11], i[12], i[13], i[14], i[15]};
    c.threads = int(i[16]);
    c.opt.epsilon = r[0];
    c.opt.momentum = r[1];
    c.opt.fixed_gain = r[2];
    c.opt.skip_threshold = r[3];
    return c;
  }
};

/// libtorch 1.13's custom Functions take no undefined tensor: an empty one means "not given".
inline bool given(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }
inline torch::Tensor or_empty(const torch::Tensor& t, const torch::Tensor& like) {
  return t.defined() ? t : torch::empty({0}, like.options());
}

/// The (N, C, H, W) extents of a tensor of 2 (N, C), 3 (N, C, L) or 4 (N, C, H, W) dimensions.
inline bkn::tensor_shape shape_of(const torch::Tensor& t) {
  const int64_t d = t.dim();
  return {t.size(0), t.size(1), d == 4 ? t.size(2) : 1, d >= 3 ? t.size(d - 1) : 1};
}

/// A view of such a tensor with its own strides: NCHW, channels_last, slices and transposes
/// are read and written where they are.
template <class T>
bkn::tensor_view<T> view_of(const torch::Tensor& t) {
  const int64_t d = t.dim();
  const bkn::tensor_strides strides{t.stride(0), t.stride(1), d == 4 ? t.stride(2) : 1,
                                    d >= 3 ? t.stride(d - 1) : 1};
  return bkn::strided(static_cast<T*>(t.data_ptr()), shape_of(t), strides);
}

/// A per-channel or per-group array; undefined or empty: "not given".
template <class P>
bkn::span<P> span_of(const torch::Tensor& t) {
  if (!given(t)) return {};
  return {static_cast<P*>(t.data_ptr()), t.numel()};
}

template <class P>
bkn::gaussian_view<P> gaussian_of(const torch::Tensor& mean, const torch::Tensor& cov) {
  if (!given(mean)) return {};
  return {span_of<P>(mean), span_of<P>(cov), mean.size(0), mean.size(1)};
}

/// The tensors of one call, by role: bkn::layer's arrays as torch tensors.
struct layer_tensors {
  torch::Tensor gamma, beta, gain_logit, noise, weights, bias;
  torch::Tensor dgamma, dbeta, dgain_logit, dnoise, dweights, dbias;
  torch::Tensor running_mean, running_var, running_skipped;
  torch::Tensor observed_mean, observed_cov, predicted_mean, predicted_cov;
  torch::Tensor posterior_mean, posterior_cov, dposterior_mean, dposterior_cov;

  template <class P>
  bkn::layer<P> view(const call& c) const {
    bkn::layer<P> L;
    L.params.gamma = span_of<const P>(gamma);
    L.params.beta = span_of<const P>(beta);
    L.params.gain_logit = span_of<const P>(gain_logit);
    L.params.noise = span_of<const P>(noise);
    const bkn::span<const P> w = span_of<const P>(weights);
    switch (c.kind) {
      case bkn::transition_kind::identity:
        break;
      case bkn::transition_kind::diagonal:
        L.params.transition = bkn::transition<P>::diagonal(w);
        break;
      case bkn::transition_kind::dense:
        L.params.transition = bkn::transition<P>::dense(w, weights.size(1));
        break;
      case bkn::transition_kind::weights:
        L.params.transition = bkn::transition<P>::conv2d(w, span_of<const P>(bias),
                                                         weights.size(1), c.conv, c.act);
        break;
    }
    L.grads = {span_of<P>(dgamma),   span_of<P>(dbeta),    span_of<P>(dgain_logit),
               span_of<P>(dnoise),   span_of<P>(dweights), span_of<P>(dbias)};
    L.running = {span_of<P>(running_mean), span_of<P>(running_var),
                 span_of<P>(running_skipped)};
    L.state.observed = gaussian_of<P>(observed_mean, observed_cov);
    L.state.predicted = gaussian_of<P>(predicted_mean, predicted_cov);
    L.state.posterior = gaussian_of<P>(posterior_mean, posterior_cov);
    L.state.dposterior = gaussian_of<P>(dposterior_mean, dposterior_cov);
    return L;
  }
};

/// (G, C) or (G, C, C) estimates for `x`'s statistics groups, uninitialized.
inline std::pair<torch::Tensor, torch::Tensor> new_gaussian(const torch::Tensor& x,
                                                            const call& c) {
  const int64_t N = x.size(0), C = x.size(1);
  // A group size that does not divide N is rejected by bkn before anything is written.
  const int64_t G = c.opt.group_size > 0 ? N / c.opt.group_size : (N > 0 ? 1 : 0);
  const auto options = x.options().memory_format(torch::MemoryFormat::Contiguous);
  torch::Tensor mean = torch::empty({G, C}, options);
  torch::Tensor cov = c.opt.mode == bkn::covariance::full ? torch::empty({G, C, C}, options)
                                                          : torch::empty({G, C}, options);
  return {mean, cov};
}

/// Host memory for bkn's scratch, from torch's allocator, 64-byte aligned.
struct workspace {
  torch::Tensor memory;
  bkn::span<std::byte> bytes;

  workspace(std::size_t size, const torch::Tensor& like)
      : memory(torch::empty({int64_t(size + bkn::workspace_alignment)},
                            like.options().dtype(torch::kByte))) {
    auto* base = static_cast<std::byte*>(memory.data_ptr());
    const std::size_t misalignment =
        reinterpret_cast<std::uintptr_t>(base) % bkn::workspace_alignment;
    const std::size_t skip = misalignment ? bkn::workspace_alignment - misalignment : 0;
    bytes = {base + skip, bkn::index_t(size)};
  }
};

inline void check_tensor(const torch::Tensor& t, const torch::Tensor& x, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device().is_cpu(), "bkn_torch: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bkn_torch: ", name, " is ", t.scalar_type(),
              " but x is ", x.scalar_type());
}

/// Per-channel and per-group arrays must be dense; they are O(C) or O(G C^2), so a rare
/// non-contiguous one (e.g. an expanded gradient) is copied. Activations never are.
inline torch::Tensor compact(const torch::Tensor& t) {
  return t.defined() ? t.contiguous() : t;
}

}  // namespace detail

/// One BKN layer as an autograd Function. Inputs: x; the prior's mean and cov (empty: no
/// prior, batch statistics); gamma, beta, gain logit, noise; the transition's weights and bias
/// (A of a diagonal or dense transition, or the host layer's weight and bias); the running
/// mean, variance and skip counts (written in training); and the call's settings. An empty
/// tensor (numel 0) is "not given". Outputs: y and the posterior's mean and cov. x, y, dy and
/// dx are viewed with their own strides.
class KalmanNormFunction : public torch::autograd::Function<KalmanNormFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
      const torch::Tensor& prior_mean, const torch::Tensor& prior_cov,
      const torch::Tensor& gamma, const torch::Tensor& beta, const torch::Tensor& gain_logit,
      const torch::Tensor& noise, const torch::Tensor& weights, const torch::Tensor& bias,
      const torch::Tensor& running_mean, const torch::Tensor& running_var,
      const torch::Tensor& running_skipped, const detail::call& c) {
    TORCH_CHECK(x.device().is_cpu(), "bkn_torch: x must be on the CPU (the Eigen backend)");
    TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
                "bkn_torch: x must be float or double, got ", x.scalar_type());
    TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, "bkn_torch: x must be (N, C), (N, C, L) or ",
                "(N, C, H, W), got ", x.dim(), " dimensions");
    TORCH_CHECK(!detail::given(prior_mean) || prior_mean.dim() == 2,
                "bkn_torch: the prior's mean must be (groups, channels)");
    const char* names[] = {"prior mean", "prior cov",  "gamma",        "beta",
                           "gain_logit", "noise",      "transition",   "transition bias",
                           "running_mean", "running_var", "running_skipped"};
    const torch::Tensor* tensors[] = {&prior_mean,  &prior_cov,   &gamma,          &beta,
                                      &gain_logit,  &noise,       &weights,        &bias,
                                      &running_mean, &running_var, &running_skipped};
    for (int i = 0; i < 11; ++i) detail::check_tensor(*tensors[i], x, names[i]);
    for (const torch::Tensor* written : {&running_mean, &running_var, &running_skipped})
      TORCH_CHECK(!written->defined() || written->is_contiguous(),
                  "bkn_torch: running statistics must be contiguous (updated in place)");

    detail::layer_tensors t;
    t.gamma = detail::compact(gamma);
    t.beta = detail::compact(beta);
    t.gain_logit = detail::compact(gain_logit);
    t.noise = detail::compact(noise);
    t.weights = detail::compact(weights);
    t.bias = detail::compact(bias);
    t.running_mean = running_mean;
    t.running_var = running_var;
    t.running_skipped = running_skipped;
    const torch::Tensor pm = detail::compact(prior_mean), pc = detail::compact(prior_cov);
    std::tie(t.observed_mean, t.observed_cov) = detail::new_gaussian(x, c);
    if (detail::given(pm))
      std::tie(t.predicted_mean, t.predicted_cov) = detail::new_gaussian(x, c);
    std::tie(t.posterior_mean, t.posterior_cov) = detail::new_gaussian(x, c);
    // empty_like keeps x's strides when x is dense (NCHW or channels_last stay so).
    torch::Tensor y = torch::empty_like(x);

    if (x.scalar_type() == torch::kDouble)
      run_forward<double>(c, t, x, y, pm, pc);
    else
      run_forward<float>(c, t, x, y, pm, pc);

    // The state stays with this node of the graph, not with the module: any number of
    // forwards may wait for their backward.
    const bool eval_running = !bkn::detail::uses_batch_statistics(c.opt);
    ctx->save_for_backward({x, pm, pc, t.gamma, t.beta, t.gain_logit, t.noise, t.weights, t.bias,
                            t.observed_mean, t.observed_cov, t.predicted_mean, t.predicted_cov,
                            t.posterior_mean, t.posterior_cov,
                            eval_running ? running_mean.clone() : torch::Tensor(),
                            eval_running ? running_var.clone() : torch::Tensor()});
    c.save(ctx);
    // An unused y or posterior reaches backward as an undefined gradient, read as zero.
    ctx->set_materialize_grads(false);
    return {y, t.posterior_mean, t.posterior_cov};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    constexpr std::size_t inputs = 13;  // forward's arguments after ctx, the call included
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined())
      return torch::autograd::variable_list(inputs);
    const detail::call c = detail::call::load(ctx);
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    const torch::Tensor &x = s[0], &prior_mean = s[1], &prior_cov = s[2];
    detail::layer_tensors t;
    t.gamma = s[3];
    t.beta = s[4];
    t.gain_logit = s[5];
    t.noise = s[6];
    t.weights = s[7];
    t.bias = s[8];
    t.observed_mean = s[9];
    t.observed_cov = s[10];
    t.predicted_mean = s[11];
    t.predicted_cov = s[12];
    t.posterior_mean = s[13];
    t.posterior_cov = s[14];
    t.running_mean = s[15];
    t.running_var = s[16];

    const torch::Tensor dy = grads[0].defined() ? grads[0] : torch::zeros_like(x);
    if (grads[1].defined() || grads[2].defined()) {
      t.dposterior_mean = grads[1].defined() ? detail::compact(grads[1])
                                             : torch::zeros_like(t.posterior_mean);
      t.dposterior_cov = grads[2].defined() ? detail::compact(grads[2])
                                            : torch::zeros_like(t.posterior_cov);
    }
    auto wanted = [&](std::size_t input, const torch::Tensor& like) {
      return ctx->needs_input_grad(input) && detail::given(like) ? torch::empty_like(like)
                                                                 : torch::Tensor();
    };
    t.dgamma = wanted(3, t.gamma);
    t.dbeta = wanted(4, t.beta);
    t.dgain_logit = wanted(5, t.gain_logit);
    t.dnoise = wanted(6, t.noise);
    t.dweights = wanted(7, t.weights);
    t.dbias = wanted(8, t.bias);
    // bkn adds a host layer's share to its gradient buffers: start them at zero.
    if (c.kind == bkn::transition_kind::weights) {
      if (t.dweights.defined()) t.dweights.zero_();
      if (t.dbias.defined()) t.dbias.zero_();
    }
    torch::Tensor dprior_mean, dprior_cov;
    if (detail::given(prior_mean) && (ctx->needs_input_grad(1) || ctx->needs_input_grad(2))) {
      dprior_mean = torch::empty_like(prior_mean);
      dprior_cov = torch::empty_like(prior_cov);
    }
    torch::Tensor dx = torch::empty_like(x);

    if (x.scalar_type() == torch::kDouble)
      run_backward<double>(c, t, x, dy, dx, prior_mean, prior_cov, dprior_mean, dprior_cov);
    else
      run_backward<float>(c, t, x, dy, dx, prior_mean, prior_cov, dprior_mean, dprior_cov);

    torch::autograd::variable_list result(inputs);
    if (ctx->needs_input_grad(0)) result[0] = dx;
    if (ctx->needs_input_grad(1)) result[1] = dprior_mean;
    if (ctx->needs_input_grad(2)) result[2] = dprior_cov;
    result[3] = t.dgamma;
    result[4] = t.dbeta;
    result[5] = t.dgain_logit;
    result[6] = t.dnoise;
    result[7] = t.dweights;
    result[8] = t.dbias;
    return result;
  }

 private:
  template <class P>
  static void run_forward(const detail::call& c, const detail::layer_tensors& t,
                          const torch::Tensor& x, const torch::Tensor& y,
                          const torch::Tensor& prior_mean, const torch::Tensor& prior_cov) {
    const bkn::eigen_backend backend{c.threads};
    const bkn::layer<P> L = t.view<P>(c);
    detail::workspace ws(
        bkn::workspace_size(backend, c.opt, detail::shape_of(x), L.params.transition), x);
    bkn::forward(backend, c.opt, L, detail::view_of<const P>(x), detail::view_of<P>(y),
                 bkn::gaussian_view<const P>(detail::gaussian_of<P>(prior_mean, prior_cov)),
                 ws.bytes);
  }

  template <class P>
  static void run_backward(const detail::call& c, const detail::layer_tensors& t,
                           const torch::Tensor& x, const torch::Tensor& dy,
                           const torch::Tensor& dx, const torch::Tensor& prior_mean,
                           const torch::Tensor& prior_cov, const torch::Tensor& dprior_mean,
                           const torch::Tensor& dprior_cov) {
    const bkn::eigen_backend backend{c.threads};
    const bkn::layer<P> L = t.view<P>(c);
    detail::workspace ws(
        bkn::workspace_size(backend, c.opt, detail::shape_of(x), L.params.transition), x);
    bkn::backward(backend, c.opt, L, detail::view_of<const P>(x), detail::view_of<const P>(dy),
                  detail::view_of<P>(dx),
                  bkn::gaussian_view<const P>(detail::gaussian_of<P>(prior_mean, prior_cov)),
                  detail::gaussian_of<P>(dprior_mean, dprior_cov), ws.bytes);
  }
};

/// A BKN layer as a torch::nn::Module. Parameters: gamma, beta, gain_logit (absent with a fixed
/// gain), noise (R = softplus(noise)) and transition (A, for a diagonal or dense transition);
/// buffers: running_mean, running_var, running_skipped. forward(x, prior) returns y and the
/// posterior; with no prior the layer is batch normalization (q = 1).
class BKNImpl : public torch::nn::Module {
 public:
  explicit BKNImpl(BKNOptions options_) : options(std::move(options_)) {
    const int64_t C = options.channels();
    TORCH_CHECK(C > 0, "bkn_torch::BKN: channels must be positive, got ", C);
    TORCH_CHECK(!options.per_channel_gain() || options.mode() == bkn::covariance::diagonal,
                "bkn_torch::BKN: full-covariance mode has one gain per layer");
    gamma = register_parameter("gamma", torch::ones({C}));
    beta = register_parameter("beta", torch::zeros({C}));
    if (options.fixed_gain() < 0) {
      const double q = options.initial_gain();
      gain_logit = register_parameter(
          "gain_logit", torch::full({options.per_channel_gain() ? C : 1}, std::log(q / (1 - q))));
    }
    noise = register_parameter("noise",
                               torch::full({C}, std::log(std::expm1(options.initial_noise()))));
    if (options.transition() == transition_type::diagonal)
      transition = register_parameter("transition", torch::ones({C}));
    if (options.transition() == transition_type::dense)
      transition = register_parameter("transition", torch::eye(C, options.in_channels()));
    running_mean = register_buffer("running_mean", torch::zeros({C}));
    running_var = register_buffer("running_var", torch::ones({C}));
    running_skipped = register_buffer("running_skipped", torch::zeros({C}));
  }

  /// Normalizes x ((N, C), (N, C, L) or (N, C, H, W), any strides) with the Kalman estimate
  /// fused from x's statistics and `prior` (the previous BKN layer's posterior; undefined: none).
  output forward(const torch::Tensor& x, const gaussian& prior = {}) {
    detail::call c;
    c.opt.mode = options.mode();
    // Normalizing with the running statistics needs no statistics groups: one estimate, the
    // moving averages, serves every sample whatever the batch size.
    const bool running =
        !is_training() && options.inference() == bkn::inference_statistics::running;
    c.opt.group_size = running ? 0 : options.group_size();
    c.opt.epsilon = options.eps();
    c.opt.momentum = options.momentum();
    c.opt.training = is_training();
    c.opt.inference = options.inference();
    c.opt.fixed_gain = options.fixed_gain();
    c.threads = at::get_num_threads();
    torch::Tensor weights, bias;
    const bool fused = prior.defined();
    if (fused) {
      switch (options.transition()) {
        case transition_type::identity:
          break;
        case transition_type::diagonal:
        case transition_type::dense:
          c.kind = options.transition() == transition_type::diagonal
                       ? bkn::transition_kind::diagonal
                       : bkn::transition_kind::dense;
          weights = transition;
          break;
        case transition_type::linear:
          c.kind = bkn::transition_kind::weights;
          c.act = options.activation();
          weights = options.linear()->weight;
          bias = options.linear()->bias;
          break;
        case transition_type::conv2d:
          c.kind = bkn::transition_kind::weights;
          c.act = options.activation();
          c.conv = geometry(options.conv()->options, prior.height, prior.width);
          weights = options.conv()->weight;
          bias = options.conv()->bias;
          break;
      }
      TORCH_CHECK(c.act != bkn::activation::custom,
                  "bkn_torch::BKN: activation::custom is not supported here");
    }
    // Without a prior the gain, noise and transition take no part: they get no gradient.
    auto arg = [&](const torch::Tensor& t) { return detail::or_empty(t, x); };
    const torch::autograd::variable_list out = KalmanNormFunction::apply(
        x, arg(prior.mean), arg(prior.cov), gamma, beta, arg(fused ? gain_logit : torch::Tensor()),
        arg(fused ? noise : torch::Tensor()), arg(weights), arg(bias), running_mean, running_var,
        running_skipped, c);
    const int64_t H = x.dim() == 4 ? x.size(2) : 1, W = x.dim() >= 3 ? x.size(-1) : 1;
    return {out[0], {out[1], out[2], H, W}};
  }

  /// The geometry bkn needs for a Conv2d whose input is in_height x in_width.
  static bkn::conv2d_geometry geometry(const torch::nn::detail::ConvNdOptions<2>& o,
                                       int64_t in_height, int64_t in_width) {
    TORCH_CHECK(!o.transposed() && o.groups() == 1 && (*o.dilation())[0] == 1 &&
                    (*o.dilation())[1] == 1 &&
                    c10::get_if<torch::enumtype::kZeros>(&o.padding_mode()) != nullptr,
                "bkn_torch::BKN: a Conv2d transition must have zero padding, no dilation, ",
                "groups or transposition");
    bkn::conv2d_geometry g;
    g.in_height = in_height;
    g.in_width = in_width;
    g.kernel_height = (*o.kernel_size())[0];
    g.kernel_width = (*o.kernel_size())[1];
    g.stride_height = (*o.stride())[0];
    g.stride_width = (*o.stride())[1];
    if (const auto* pad = c10::get_if<torch::ExpandingArray<2>>(&o.padding())) {
      g.pad_height = (**pad)[0];
      g.pad_width = (**pad)[1];
    } else if (c10::get_if<torch::enumtype::kSame>(&o.padding()) != nullptr) {
      TORCH_CHECK(g.kernel_height % 2 == 1 && g.kernel_width % 2 == 1,
                  "bkn_torch::BKN: padding 'same' needs an odd kernel (symmetric padding)");
      g.pad_height = g.kernel_height / 2;
      g.pad_width = g.kernel_width / 2;
    }
    return g;
  }

  BKNOptions options;
  torch::Tensor gamma, beta, gain_logit, noise, transition;
  torch::Tensor running_mean, running_var, running_skipped;
};

TORCH_MODULE(BKN);

}  // namespace bkn_torch
