// SPDX-License-Identifier: MIT
// Trains a small convolutional network whose three normalization layers are BKN layers, on
// synthetic images, in statistics groups of 2 samples: each layer's posterior is the next
// layer's prior, predicted through the host's own convolution. Prints the loss; exits non-zero
// unless it decreased. Then classifies fresh images with the running statistics (eval()).
#include "bkn_torch.hpp"  // first: it includes everything it needs

#include <torch/torch.h>

#include <cstdio>
#include <utility>

namespace {

constexpr int64_t kClasses = 4, kBatch = 16, kGroupSize = 2, kSteps = 60, kWidth = 16;

/// 3 x 8 x 8 images of four textures (horizontal or vertical stripes, a checkerboard, 2 x 2
/// blocks) under noise of the same amplitude, each channel with its own contrast.
std::pair<torch::Tensor, torch::Tensor> make_data(int64_t n) {
  const torch::Tensor h = torch::arange(8).view({8, 1}), w = torch::arange(8).view({1, 8});
  const torch::Tensor blocks = (h.div(2, "floor") + w.div(2, "floor")) % 2;
  const torch::Tensor patterns =
      torch::stack({(h % 2).expand({8, 8}), (w % 2).expand({8, 8}), (h + w) % 2, blocks})
          .to(torch::kFloat) * 2 - 1;
  const torch::Tensor labels = torch::randint(kClasses, {n}, torch::kLong);
  const torch::Tensor contrast = torch::rand({n, 3, 1, 1}) + 0.5;
  const torch::Tensor images =
      patterns.index_select(0, labels).unsqueeze(1) * contrast + torch::randn({n, 3, 8, 8});
  return {images, labels};
}

struct NetImpl : torch::nn::Module {
  // The convolutions come first: the BKN layers that predict through them are built from them.
  torch::nn::Conv2d conv1{torch::nn::Conv2dOptions(3, kWidth, 3).padding(1)};
  torch::nn::Conv2d conv2{torch::nn::Conv2dOptions(kWidth, kWidth, 3).padding(1)};
  torch::nn::Conv2d conv3{torch::nn::Conv2dOptions(kWidth, kWidth, 3).padding(1).stride(2)};
  torch::nn::Linear head{kWidth, kClasses};
  bkn_torch::BKN bn1{bkn_torch::BKNOptions(kWidth).group_size(kGroupSize)};
  bkn_torch::BKN bn2{bkn_torch::BKNOptions(kWidth).group_size(kGroupSize).through(conv2)};
  bkn_torch::BKN bn3{bkn_torch::BKNOptions(kWidth).group_size(kGroupSize).through(conv3)};

  NetImpl() {
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("conv3", conv3);
    register_module("head", head);
    register_module("bn1", bn1);
    register_module("bn2", bn2);
    register_module("bn3", bn3);
  }

  torch::Tensor forward(const torch::Tensor& x) {
    const bkn_torch::output a = bn1(conv1(x));  // no prior: batch statistics
    const bkn_torch::output b = bn2(conv2(torch::relu(a.y)), a.posterior);
    const bkn_torch::output c = bn3(conv3(torch::relu(b.y)), b.posterior);
    return head(torch::relu(c.y).mean({2, 3}));
  }
};
TORCH_MODULE(Net);

}  // namespace

int main() {
  torch::manual_seed(0);
  Net net;
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  const auto [images, labels] = make_data(kBatch * kSteps);

  double first = 0, last = 0;  // mean loss of the first and of the last 10 steps
  for (int64_t step = 0; step < kSteps; ++step) {
    const torch::Tensor x = images.slice(0, step * kBatch, (step + 1) * kBatch);
    const torch::Tensor t = labels.slice(0, step * kBatch, (step + 1) * kBatch);
    optimizer.zero_grad();
    const torch::Tensor loss = torch::nn::functional::cross_entropy(net(x), t);
    loss.backward();  // through bn3, conv3, bn2 (and its prior), conv2, bn1 (and its posterior)
    optimizer.step();
    const double value = loss.item<double>();
    if (step < 10) first += value / 10;
    if (step >= kSteps - 10) last += value / 10;
    if (step % 10 == 0 || step == kSteps - 1)
      std::printf("step %2ld  loss %.4f\n", long(step), value);
  }
  std::printf("mean loss: first 10 steps %.4f, last 10 steps %.4f\n", first, last);
  std::printf("learned gains q: layer 2 %.3f, layer 3 %.3f\n",
              torch::sigmoid(net->bn2->gain_logit).item<double>(),
              torch::sigmoid(net->bn3->gain_logit).item<double>());

  net->eval();  // normalize with the running statistics
  torch::NoGradGuard no_grad;
  const auto [test_images, test_labels] = make_data(512);
  const double accuracy =
      net(test_images).argmax(1).eq(test_labels).to(torch::kDouble).mean().item<double>();
  std::printf("accuracy on 512 fresh images (eval, running statistics): %.3f (chance %.3f)\n",
              accuracy, 1.0 / kClasses);

  if (!(last < 0.8 * first)) {
    std::printf("FAIL: the loss did not decrease by 20%%\n");
    return 1;
  }
  return 0;
}
