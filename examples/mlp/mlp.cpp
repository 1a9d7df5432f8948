// SPDX-License-Identifier: MIT
// bkn_mlp: trains an MLP with each normalization choice at each (gradient batch, statistics
// batch) setting on Fashion-MNIST or CIFAR-10, and reports test accuracy with moving and with
// batch statistics (the paper's micro-batch claim, issue #7). docs/demo.md has the results.
//
//   bkn_mlp [--dataset fashion-mnist|cifar10] [--data DIR] [--out DIR]
//           [--methods bn,bkn,...] [--settings 128x128,128x2,...] [--epochs E] [--seeds 1,2]
//           [--hidden 512,256] [--lr 0.1] [--momentum 0.9] [--weight-decay 5e-4]
//           [--schedule cosine|step|constant] [--warmup-epochs W] [--no-lr-scaling]
//           [--stats-momentum M] [--train-limit N] [--test-limit N] [--threads T]
//           [--no-plot] [--no-progress]
#include <bkn/backends/eigen.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "data.hpp"
#include "methods.hpp"
#include "network.hpp"
#include "report.hpp"

namespace {

using mlp::index_t;
using T = float;
using backend_type = bkn::eigen_backend;

struct settings {
  std::string dataset = "fashion-mnist";
  std::string data_dir;  // default per dataset
  std::string out = "mlp_out";
  std::vector<mlp::method> methods{mlp::parse_method("bn"), mlp::parse_method("bkn")};
  std::vector<mlp::setting> settings_{{128, 128}, {128, 2}};
  int epochs = 10;
  std::vector<std::uint64_t> seeds{1};
  std::vector<index_t> hidden{512, 256};
  double lr = 0.1;  // at gradient batch 128; scaled linearly with the batch unless told not to
  bool lr_scaling = true;
  double momentum = 0.9, weight_decay = 5e-4;
  std::string schedule = "cosine";
  double warmup_epochs = 0;
  double stats_momentum = -1;  // negative: 0.1 x min(1, batch / 128)
  index_t train_limit = 0, test_limit = 0;
  int threads = 1;
  bool plot = true, progress = true;
  bool replot = false;
  std::vector<std::string> command;  // as given, for run.txt
};

void usage(std::FILE* f) {
  std::fprintf(
      f,
      "usage: bkn_mlp [options]\n"
      "  --dataset D        fashion-mnist (default) or cifar10\n"
      "  --data DIR         where the files are (default /usr/share/datasets/fashion-mnist;\n"
      "                     CIFAR-10: the folder of data_batch_1.bin .. test_batch.bin)\n"
      "  --out DIR          where epochs.csv, summary.md/.csv, accuracy.gp/.png go (mlp_out)\n"
      "  --methods LIST     normalization choices (bn,bkn): none, bn, brn, gn[:groups=G], ln,\n"
      "                     bkn[:OPTIONS] with\n"
      "                     OPTIONS from identity|diagonal|dense|weights (the transition;\n"
      "                     weights by default), q=<fixed gain> (learned by default),\n"
      "                     per-channel, no-input-prior; e.g. bkn:dense:q=0.1\n"
      "  --settings LIST    (gradient batch)x(statistics batch) pairs (128x128,128x2)\n"
      "  --epochs E         epochs per run (10)\n"
      "  --seeds LIST       seeds; one run per seed, the table shows mean ± sd (1)\n"
      "  --hidden LIST      hidden layer widths (512,256)\n"
      "  --lr LR            learning rate at gradient batch 128 (0.1)\n"
      "  --no-lr-scaling    use --lr at every batch size (default: lr x batch / 128)\n"
      "  --momentum M       SGD momentum (0.9)\n"
      "  --weight-decay W   on the linear layers' weights (5e-4)\n"
      "  --schedule S       cosine (default), step (x0.1 at 50%% and 75%%) or constant\n"
      "  --warmup-epochs W  linear warm-up of the learning rate (0)\n"
      "  --stats-momentum M momentum of the moving averages (0.1 x min(1, batch / 128))\n"
      "  --train-limit N    use the first N training images (all)\n"
      "  --test-limit N     use the first N test images (all)\n"
      "  --threads T        threads for Eigen and bkn (1)\n"
      "  --no-plot          do not run gnuplot\n"
      "  --no-progress      no progress bar (it is only drawn on a terminal anyway)\n"
      "  --replot           train nothing: the table and plot again from --out's epochs.csv\n"
      "                     and run.txt (e.g. of an interrupted run)\n");
}

template <class V>
std::vector<V> parse_numbers(const std::string& what, const std::string& text) {
  std::vector<V> out;
  for (const std::string& item : mlp::split(text, ',')) {
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size() || v < 0)
      throw std::invalid_argument(what + ": '" + item + "' is not a non-negative integer");
    out.push_back(V(v));
  }
  if (out.empty()) throw std::invalid_argument(what + ": empty list");
  return out;
}

double parse_double(const std::string& what, const std::string& text) {
  std::size_t used = 0;
  double v = NAN;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !std::isfinite(v))
    throw std::invalid_argument(what + ": '" + text + "' is not a number");
  return v;
}

settings parse(int argc, char** argv) {
  settings s;
  s.command.assign(argv, argv + argc);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--dataset") {
      s.dataset = value();
    } else if (a == "--data") {
      s.data_dir = value();
    } else if (a == "--out") {
      s.out = value();
    } else if (a == "--methods") {
      s.methods.clear();
      for (const std::string& m : mlp::split(value(), ',')) s.methods.push_back(mlp::parse_method(m));
    } else if (a == "--settings") {
      s.settings_.clear();
      for (const std::string& item : mlp::split(value(), ',')) {
        const std::vector<std::string> pair = mlp::split(item, 'x');
        if (pair.size() != 2)
          throw std::invalid_argument("--settings: '" + item +
                                      "' is not <gradient batch>x<statistics batch>");
        const index_t b = parse_numbers<index_t>("--settings", pair[0])[0];
        const index_t st = parse_numbers<index_t>("--settings", pair[1])[0];
        if (b < 1 || st < 1 || b % st != 0)
          throw std::invalid_argument("--settings: '" + item +
                                      "': the statistics batch must divide the gradient batch");
        s.settings_.push_back({b, st});
      }
    } else if (a == "--epochs") {
      s.epochs = int(parse_numbers<index_t>(a, value())[0]);
    } else if (a == "--seeds") {
      s.seeds = parse_numbers<std::uint64_t>(a, value());
    } else if (a == "--hidden") {
      s.hidden = parse_numbers<index_t>(a, value());
    } else if (a == "--lr") {
      s.lr = parse_double(a, value());
    } else if (a == "--no-lr-scaling") {
      s.lr_scaling = false;
    } else if (a == "--momentum") {
      s.momentum = parse_double(a, value());
    } else if (a == "--weight-decay") {
      s.weight_decay = parse_double(a, value());
    } else if (a == "--schedule") {
      s.schedule = value();
    } else if (a == "--warmup-epochs") {
      s.warmup_epochs = parse_double(a, value());
    } else if (a == "--stats-momentum") {
      s.stats_momentum = parse_double(a, value());
    } else if (a == "--train-limit") {
      s.train_limit = parse_numbers<index_t>(a, value())[0];
    } else if (a == "--test-limit") {
      s.test_limit = parse_numbers<index_t>(a, value())[0];
    } else if (a == "--threads") {
      s.threads = int(parse_numbers<index_t>(a, value())[0]);
    } else if (a == "--no-plot") {
      s.plot = false;
    } else if (a == "--no-progress") {
      s.progress = false;
    } else if (a == "--replot") {
      s.replot = true;
    } else if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option " + a);
    }
  }
  if (s.dataset != "fashion-mnist" && s.dataset != "cifar10")
    throw std::invalid_argument("--dataset: expected fashion-mnist or cifar10, got " + s.dataset);
  if (s.data_dir.empty()) {
    if (s.dataset == "cifar10")
      throw std::invalid_argument("--dataset cifar10 needs --data DIR (CIFAR-10's binary version)");
    s.data_dir = "/usr/share/datasets/fashion-mnist";
  }
  if (s.epochs < 1) throw std::invalid_argument("--epochs: expected at least 1");
  if (s.threads < 1) throw std::invalid_argument("--threads: expected at least 1");
  if (s.schedule != "cosine" && s.schedule != "step" && s.schedule != "constant")
    throw std::invalid_argument("--schedule: expected cosine, step or constant");
  if (!(s.lr > 0)) throw std::invalid_argument("--lr: expected > 0");
  if (!(s.momentum >= 0 && s.momentum < 1)) throw std::invalid_argument("--momentum: expected [0, 1)");
  if (!(s.weight_decay >= 0)) throw std::invalid_argument("--weight-decay: expected >= 0");
  if (!(s.warmup_epochs >= 0)) throw std::invalid_argument("--warmup-epochs: expected >= 0");
  if (s.stats_momentum >= 0 && s.stats_momentum > 1)
    throw std::invalid_argument("--stats-momentum: expected [0, 1]");
  for (index_t w : s.hidden)
    if (w < 1) throw std::invalid_argument("--hidden: widths must be >= 1");
  // An identity or diagonal transition needs equal widths: fail now, not after hours of runs.
  for (const mlp::method& m : s.methods)
    if (m.kind == "bkn" && (m.bkn.transition == mlp::bkn_transition::identity ||
                            m.bkn.transition == mlp::bkn_transition::diagonal))
      for (std::size_t k = 1; k < s.hidden.size(); ++k)
        if (s.hidden[k] != s.hidden[0])
          throw std::invalid_argument("method " + m.name() +
                                      " needs equal hidden widths (e.g. --hidden 256,256)");
  return s;
}

/// The learning rate at step t of `total`: warm-up, then the schedule.
double learning_rate(const settings& s, double base, index_t t, index_t total, index_t warmup) {
  if (t < warmup) return base * double(t + 1) / double(warmup);
  const double progress = total > warmup ? double(t - warmup) / double(total - warmup) : 0.0;
  if (s.schedule == "cosine") return base * 0.5 * (1 + std::cos(3.14159265358979323846 * progress));
  if (s.schedule == "step") return base * (progress < 0.5 ? 1.0 : progress < 0.75 ? 0.1 : 0.01);
  return base;
}

/// Test accuracy (%) with moving statistics, or with each group of `statistics` consecutive
/// test images normalized by its own statistics. The test set is cut into groups of that size;
/// when it does not divide the set, the leftover images join the last group (one group of one
/// image would carry no batch statistics).
double evaluate(mlp::network<T>& net, const mlp::dataset& data, mlp::phase ph,
                index_t statistics, mlp::buffer<T>& buffer) {
  const mlp::image_set& test = data.test;
  const index_t F = data.features();
  std::vector<index_t> order(std::size_t(test.count));
  std::iota(order.begin(), order.end(), index_t(0));
  index_t correct = 0;
  // The normalization cuts each call into groups of its statistics batch, or takes the whole
  // call as one group when that does not divide it (the last call, with the leftover).
  const auto run = [&](index_t first, index_t count) {
    buffer.resize(std::size_t(count * F));
    data.gather(test, order, first, count, buffer.data());
    const T* logits = net.forward(buffer.data(), count, ph);
    for (index_t i = 0; i < count; ++i) {
      const T* z = logits + i * mlp::classes;
      if (std::max_element(z, z + mlp::classes) - z == test.labels[std::size_t(first + i)])
        ++correct;
    }
  };
  if (ph == mlp::phase::infer_moving) {
    for (index_t first = 0; first < test.count; first += 1000)
      run(first, std::min<index_t>(1000, test.count - first));
  } else {
    const index_t s = std::min(statistics, test.count);
    const index_t whole = test.count / s;  // full groups
    const index_t per_call = std::max<index_t>(1, 1024 / s);
    const index_t regular = test.count % s == 0 ? whole : whole - 1;  // the last one grows
    for (index_t g = 0; g < regular; g += per_call)
      run(g * s, std::min(per_call, regular - g) * s);
    if (regular < whole) run(regular * s, test.count - regular * s);
  }
  return 100.0 * double(correct) / double(test.count);
}

struct run_result {
  std::vector<mlp::epoch_record> epochs;
  bool diverged = false;
};

std::string gains_text(const std::vector<double>& q) {
  std::string text;
  for (std::size_t k = 0; k < q.size(); ++k) text += (k ? "/" : "") + mlp::number("%.3f", q[k]);
  return text;
}

run_result train(const settings& s, const mlp::dataset& data, const mlp::method& method,
                 const mlp::setting& set, std::uint64_t seed, mlp::epoch_log& log,
                 mlp::progress_bar& bar) {
  const index_t F = data.features();
  const index_t B = set.batch;
  if (data.train.count < B)
    throw std::invalid_argument("the gradient batch " + std::to_string(B) + " is larger than the " +
                                std::to_string(data.train.count) + " training images");
  mlp::network<T> net(F, s.hidden, mlp::classes, seed);
  std::vector<double> input_mean, input_var;
  if (method.kind == "bkn" && method.bkn.input_prior) data.feature_statistics(input_mean, input_var);
  // The largest call: a training batch, or an evaluation call (up to 1024 images, plus the
  // leftover that joins the last group).
  const index_t max_batch = std::max<index_t>({B, 1024 + set.statistics, 2 * set.statistics});
  mlp::statistics_settings stats;
  stats.statistics_batch = set.statistics;
  stats.momentum = s.stats_momentum >= 0 ? s.stats_momentum : 0.1 * std::min(1.0, double(B) / 128);
  net.set_normalization(mlp::make_normalization<backend_type, T>(
      method, backend_type{s.threads}, net.host(max_batch, input_mean, input_var), stats));
  mlp::sgd<T> optimizer(net.parameters(), s.momentum, s.weight_decay);

  const double base_lr = s.lr * (s.lr_scaling ? double(B) / 128.0 : 1.0);
  const index_t steps = data.train.count / B;  // the last partial batch is dropped
  const index_t total = steps * s.epochs;
  const index_t warmup = index_t(std::llround(s.warmup_epochs * double(steps)));
  mlp::rng shuffle(seed, 1);
  std::vector<index_t> order(std::size_t(data.train.count));
  std::iota(order.begin(), order.end(), index_t(0));
  mlp::buffer<T> x(std::size_t(B * F)), buffer;
  std::vector<std::uint8_t> labels(static_cast<std::size_t>(B));

  run_result result;
  for (int epoch = 1; epoch <= s.epochs; ++epoch) {
    shuffle.shuffle(order);
    const std::string label = method.name() + " " + set.name() + " seed " +
                              std::to_string(seed) + " epoch " + std::to_string(epoch) + "/" +
                              std::to_string(s.epochs);
    bar.start(label, steps);
    const auto t0 = std::chrono::steady_clock::now();
    double loss_sum = 0, lr = base_lr;
    index_t correct = 0;
    for (index_t step = 0; step < steps; ++step) {
      data.gather(data.train, order, step * B, B, x.data());
      for (index_t i = 0; i < B; ++i)
        labels[std::size_t(i)] = data.train.labels[std::size_t(order[std::size_t(step * B + i)])];
      net.norm().set_progress(double((epoch - 1) * steps + step) / double(total));
      net.forward(x.data(), B, mlp::phase::train);
      const double loss = net.backward(labels.data(), &correct);
      if (!std::isfinite(loss) || loss > 1e3) {
        result.diverged = true;
        break;
      }
      loss_sum += loss;
      lr = learning_rate(s, base_lr, (epoch - 1) * steps + step, total, warmup);
      optimizer.step(lr);
      bar.update(step + 1, (step + 1) * B);
    }
    bar.finish();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (result.diverged) {
      std::printf("%s: diverged (loss not finite or > 1e3); the run stops\n", label.c_str());
      break;
    }
    mlp::epoch_record r;
    r.method = method.name();
    r.set = set;
    r.seed = seed;
    r.epoch = epoch;
    r.lr = lr;
    r.train_loss = loss_sum / double(steps);
    r.train_accuracy = 100.0 * double(correct) / double(steps * B);
    r.test_moving = evaluate(net, data, mlp::phase::infer_moving, set.statistics, buffer);
    r.test_batch = evaluate(net, data, mlp::phase::infer_batch, set.statistics, buffer);
    r.seconds = seconds;
    r.gains = gains_text(net.norm().gains());
    log.write(r);
    std::printf("%s: loss %.4f, train %.2f%%, test %.2f%% (moving) %.2f%% (batch)%s%s, %.1f s\n",
                label.c_str(), r.train_loss, r.train_accuracy, r.test_moving, r.test_batch,
                r.gains.empty() ? "" : ", q ", r.gains.c_str(), seconds);
    std::fflush(stdout);
    result.epochs.push_back(r);
  }
  return result;
}

/// The table (printed, summary.md, summary.csv) and the plot of a folder's runs.
int report(const std::string& out, const std::vector<mlp::epoch_record>& records,
           const std::vector<std::string>& methods, const std::vector<mlp::setting>& settings_list,
           int epochs, const std::string& title, bool plot) {
  const std::vector<mlp::summary_row> rows = mlp::summarize(records, methods, settings_list, epochs);
  const std::string table = mlp::summary_table(
      rows, "Final test accuracy (last epoch), mean ± sd over seeds. " + title + ".");
  std::printf("\n%s\n", table.c_str());
  {
    std::ofstream md(out + "/summary.md");
    md << table;
    if (!md) throw std::runtime_error("writing " + out + "/summary.md failed");
  }
  mlp::write_summary_csv(out + "/summary.csv", rows);
  mlp::write_gnuplot(out + "/accuracy.gp", records, methods, settings_list, title);
  std::printf("table: %s/summary.md (and summary.csv); per-epoch log: %s/epochs.csv\n",
              out.c_str(), out.c_str());
  if (!plot) return 0;
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::printf("gnuplot not found: no plot (install gnuplot-nox, then run `gnuplot accuracy.gp` "
                "in %s)\n", out.c_str());
    return 0;
  }
  const std::string command = "cd '" + out + "' && gnuplot accuracy.gp";
  if (std::system(command.c_str()) != 0) {
    std::fprintf(stderr, "bkn_mlp: gnuplot failed on %s/accuracy.gp\n", out.c_str());
    return 1;
  }
  std::printf("plot: %s/accuracy.png\n", out.c_str());
  return 0;
}

int run(const settings& s) {
  mlp::dataset data = s.dataset == "cifar10"
                          ? mlp::load_cifar10(s.data_dir, s.train_limit, s.test_limit)
                          : mlp::load_fashion_mnist(s.data_dir, s.train_limit, s.test_limit);
  if (data.test.count < 2) throw std::invalid_argument("need at least 2 test images");
  Eigen::setNbThreads(s.threads);
  std::filesystem::create_directories(s.out);
  const std::string out = std::filesystem::canonical(s.out).string();
  std::printf("%s: %lld training and %lld test images of %lld features; MLP %lld", data.name.c_str(),
              (long long)data.train.count, (long long)data.test.count, (long long)data.features(),
              (long long)data.features());
  for (index_t w : s.hidden) std::printf(" -> %lld", (long long)w);
  std::printf(" -> %d; %d epoch(s), %zu seed(s), %d thread(s)\n", mlp::classes, s.epochs,
              s.seeds.size(), s.threads);
  std::fflush(stdout);

  std::string title = data.name + ", MLP " + std::to_string(data.features());
  for (index_t w : s.hidden) title += "-" + std::to_string(w);
  title += "-10, " + std::to_string(s.epochs) + (s.epochs == 1 ? " epoch" : " epochs");
  if (s.train_limit > 0) title += " on the first " + std::to_string(data.train.count) + " training images";
  title += s.seeds.size() == 1 ? ", seed" : ", seeds";
  for (std::size_t i = 0; i < s.seeds.size(); ++i)
    title += (i ? "," : " ") + std::to_string(s.seeds[i]);
  {
    // What --replot needs besides the log, and the command that made it.
    std::ofstream run(out + "/run.txt");
    run << "title: " << title << "\ncommand:";
    for (const std::string& a : s.command) run << ' ' << a;
    run << "\nmethods:";
    for (const mlp::method& m : s.methods) run << ' ' << m.name();
    run << "\nsettings:";
    for (const mlp::setting& set : s.settings_) run << ' ' << set.tag();
    run << "\nepochs: " << s.epochs << '\n';
    if (!run) throw std::runtime_error("writing " + out + "/run.txt failed");
  }

  mlp::epoch_log log(out + "/epochs.csv");
  mlp::progress_bar bar(s.progress && mlp::progress_bar::terminal());
  std::vector<mlp::epoch_record> all;
  std::vector<std::string> names;
  for (const mlp::method& m : s.methods) names.push_back(m.name());
  // Seeds outermost: after the first seed every cell of the table has a number.
  for (std::uint64_t seed : s.seeds)
    for (const mlp::setting& set : s.settings_)
      for (const mlp::method& m : s.methods) {
        const run_result r = train(s, data, m, set, seed, log, bar);
        all.insert(all.end(), r.epochs.begin(), r.epochs.end());
      }
  return report(out, all, names, s.settings_, s.epochs, title, s.plot);
}

/// --replot: the table and the plot again from a finished or interrupted run's folder.
int replot(const settings& s) {
  const std::string out = s.out;
  std::ifstream run(out + "/run.txt");
  if (!run) throw std::runtime_error("cannot read " + out + "/run.txt (not a bkn_mlp folder?)");
  std::string title;
  std::vector<std::string> methods;
  std::vector<mlp::setting> settings_list;
  int epochs = 0;
  for (std::string line; std::getline(run, line);) {
    const std::size_t colon = line.find(": ");
    if (colon == std::string::npos) continue;
    const std::string key = line.substr(0, colon), value = line.substr(colon + 2);
    if (key == "title") title = value;
    if (key == "epochs") epochs = std::stoi(value);
    std::stringstream words(value);
    for (std::string w; words >> w;) {
      if (key == "methods") methods.push_back(w);
      if (key == "settings") {
        const std::vector<std::string> pair = mlp::split(w, 'x');
        settings_list.push_back({std::stoll(pair.at(0)), std::stoll(pair.at(1))});
      }
    }
  }
  if (methods.empty() || settings_list.empty() || epochs < 1)
    throw std::runtime_error(out + "/run.txt: no methods, settings or epochs");
  return report(out, mlp::read_epoch_log(out + "/epochs.csv"), methods, settings_list, epochs,
                title, s.plot);
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  try {
    s = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bkn_mlp: %s\n", e.what());
    usage(stderr);
    return 2;
  }
  try {
    return s.replot ? replot(s) : run(s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bkn_mlp: %s\n", e.what());
    return 1;
  }
}
