// Two BKN layers over host buffers: forward in order, backward in reverse.
#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const bkn::index_t N = 8, C = 4, H = 5, W = 5;  // micro-batch of 8 in groups of 2
  bkn::options opt;
  opt.group_size = 2;  // the paper's statistics-batch-size

  bkn::layer_config cfg;
  cfg.channels = C;
  cfg.groups = N / opt.group_size;
  cfg.transition = bkn::transition_kind::diagonal;
  bkn::layer_storage<float> first(cfg), second(cfg);  // or views of your own buffers
  const bkn::layer<float> layers[] = {first.view(), second.view()};

  bkn::reference_backend backend;  // or bkn::eigen_backend{threads}, ...
  bkn::chain<bkn::reference_backend, float> net(backend, opt, layers);
  bkn::host_workspace ws(bkn::workspace_size(backend, opt, {N, C, H, W}));

  std::vector<float> x(N * C * H * W), y1(x.size()), y2(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i % 7) - 3.0f;
  auto view = [&](std::vector<float>& v) { return bkn::nchw(v.data(), N, C, H, W); };

  net.forward(0, view(x), view(y1), ws.bytes());   // no prior: batch statistics
  // ... the host's own layers would map y1 to the next layer's input here ...
  net.forward(1, view(y1), view(y2), ws.bytes());  // prior: layer 0's posterior

  std::vector<float> dy2(x.size(), 0.01f), dy1(x.size()), dx(x.size());
  net.backward(1, view(y1), view(dy2), view(dy1), ws.bytes());
  net.backward(0, view(x), view(dy1), view(dx), ws.bytes());

  std::printf("q = %.3f, dgain = %.3g, dx[0] = %.3g\n", 1 / (1 + std::exp(-second.gain_logit[0])),
              second.dgain_logit[0], dx[0]);
}
