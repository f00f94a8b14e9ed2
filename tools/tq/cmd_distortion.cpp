// tq distortion: our quantizers' distortion on random unit vectors, beside
// the TurboQuant paper's numbers and its bounds.
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.hpp"
#include "turboquant/distortion.hpp"
#include "turboquant/error.hpp"
#include "turboquant/format.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string method = "mse";
  int dim = 128;
  std::string bits = "1,2,3,4";
  size_t samples = 20000;
  std::string rotation = "hadamard";
  std::string sketch = "orth";
  std::string scale = "norm";
  std::string codebook = "exact";
  uint64_t seed = 1;
  int threads = 1;
  bool json = false;
  std::vector<std::string> formats;  // --format: these specs instead of --method / --bits
};

std::vector<double> parse_bits_list(const std::string& s) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    size_t pos = 0;
    double b = 0;
    try {
      b = std::stod(tok, &pos);
    } catch (...) {
      pos = 0;
    }
    TQ_REQUIRE(pos == tok.size() && !tok.empty(), "--bits: '", tok,
               "' is not a number (expected a list like 1,2,3,4 or 2.5,3.5)");
    out.push_back(b);
  }
  TQ_REQUIRE(!out.empty(), "--bits: empty list");
  return out;
}

FormatSpec spec_for(const Args& a, double b) {
  std::string s;
  auto num = [](double v) {
    std::ostringstream os;
    os << v;
    return os.str();
  };
  TQ_REQUIRE(b >= 1 && b <= 8, "--bits: ", num(b), " is outside 1..8");
  if (a.method == "mse") {
    s = "tq-mse:b=" + num(b);
  } else if (a.method == "prod") {
    TQ_REQUIRE(b == std::floor(b), "--bits: prod needs whole bit widths, got ", num(b));
    s = "tq-prod:b=" + num(b) + ",s=" + a.sketch;
  } else {
    // PolarQuant: B = bits of the angles at levels >= 2; level 1 gets B + 2
    // (the paper's 4/2 pattern at B = 2).
    TQ_REQUIRE(b == std::floor(b) && b <= 6, "--bits: polar needs whole widths 1..6, got ", num(b));
    s = "polar:b1=" + num(b + 2) + ",b=" + num(b);
  }
  FormatSpec f = parse_format(s);
  f.rotation = a.rotation == "haar" ? RotationKind::haar : RotationKind::hadamard;
  if (a.method != "polar") {
    f.scale = a.scale == "ls" ? ScaleMode::ls : a.scale == "matched" ? ScaleMode::matched : ScaleMode::norm;
    f.law = a.codebook == "gauss" ? CodebookLaw::gauss : CodebookLaw::exact;
  }
  return f;
}

// --format SPEC ...: any formats side by side (e.g. rotated q4_0 against
// tq-mse at their real bits per coordinate); no paper columns.
int run_formats(const Args& a) {
  std::vector<FormatSpec> specs;
  for (const auto& f : a.formats) {
    specs.push_back(parse_format(f));
    validate_format(specs.back(), a.dim);
  }
  nlohmann::json out = nlohmann::json::array();
  if (!a.json)
    std::printf("tq distortion: dim %d, %zu random unit vectors and queries, seed %llu\n%-30s %7s %10s %10s %10s %10s %8s\n",
                a.dim, a.samples, static_cast<unsigned long long>(a.seed), "format", "b/coord", "mse", "mse_se",
                "ip_bias", "ip_var", "seconds");
  for (const FormatSpec& f : specs) {
    const DistortionResult r = measure_distortion(f, a.dim, a.samples, a.seed, a.threads);
    if (a.json)
      out.push_back({{"format", to_string(f)}, {"dim", a.dim}, {"bits_per_coord", r.bits_per_coord},
                     {"mse", r.mse}, {"mse_stderr", r.mse_stderr}, {"ip_bias", r.ip_bias}, {"ip_var", r.ip_var},
                     {"seconds", r.seconds}});
    else
      std::printf("%-30s %7.3f %10.5f %10.5f %+10.5f %10.5f %8.3f\n", to_string(f).c_str(), r.bits_per_coord, r.mse,
                  r.mse_stderr, r.ip_bias, r.ip_var, r.seconds);
  }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

int run(const Args& a) {
  if (!a.formats.empty()) return run_formats(a);
  const std::vector<double> bits = parse_bits_list(a.bits);
  for (double b : bits) validate_format(spec_for(a, b), a.dim);  // all flags checked before any output
  nlohmann::json out = nlohmann::json::array();
  if (!a.json) {
    std::printf("tq distortion: %s, dim %d, %zu random unit vectors and queries, rotation %s, seed %llu\n",
                a.method.c_str(), a.dim, a.samples, a.rotation.c_str(),
                static_cast<unsigned long long>(a.seed));
    if (a.method == "prod")
      std::printf("  ip_var = dim * Var(<y,x_hat> - <y,x>) compares with dim * D_prod (paper, Gaussian S)\n");
    std::printf("%-26s %5s %7s %10s %8s %8s %8s %10s %10s %10s %8s\n", "format", "bits", "b/coord",
                "mse", "paper", "lower", "upper", "ip_bias", "ip_var", "paper_var", "seconds");
  }
  for (double b : bits) {
    const FormatSpec f = spec_for(a, b);
    const DistortionResult r = measure_distortion(f, a.dim, a.samples, a.seed, a.threads);
    if (a.json) {
      out.push_back({{"method", a.method},
                     {"dim", a.dim},
                     {"bits", b},
                     {"bits_per_coord", r.bits_per_coord},
                     {"mse", r.mse},
                     {"ip_bias", r.ip_bias},
                     {"ip_var", r.ip_var},
                     {"seconds", r.seconds}});
      continue;
    }
    auto opt = [](std::optional<double> v) {
      char buf[32];
      if (v) std::snprintf(buf, sizeof buf, "%.4g", *v);
      else std::snprintf(buf, sizeof buf, "-");
      return std::string(buf);
    };
    const bool ib = b == std::floor(b);
    std::optional<double> pm, pv, lo, hi;
    if (a.method == "mse") {
      if (ib) pm = paper_mse(int(b));
      lo = mse_lower_bound(b);
      hi = mse_upper_bound(b);
    } else if (a.method == "prod") {
      pv = paper_prod_dvar(int(b));
      lo = prod_lower_bound(b);
      hi = prod_upper_bound(b);
    }
    std::printf("%-26s %5g %7.3f %10.5f %8s %8s %8s %+10.5f %10.5f %10s %8.3f\n",
                to_string(f).c_str(), b, r.bits_per_coord, r.mse, opt(pm).c_str(),
                opt(lo).c_str(), opt(hi).c_str(), r.ip_bias, r.ip_var, opt(pv).c_str(), r.seconds);
  }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  else if (a.method != "polar")
    std::printf("bounds: %s for %s (Thm %s of the TurboQuant paper)\n",
                a.method == "mse" ? "4^-b <= D_mse <= sqrt(3)pi/2 4^-b"
                                  : "4^-b <= d*D_prod <= sqrt(3)pi^2 4^-b",
                a.method == "mse" ? "unit x" : "unit x, y", a.method == "mse" ? "1" : "2");
  return 0;
}

}  // namespace

Runner add_distortion(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "distortion", "Measure MSE and inner-product error on random unit vectors vs the paper");
  sub->add_option("--method", a->method, "mse | prod | polar")
      ->check(CLI::IsMember({"mse", "prod", "polar"}))
      ->capture_default_str();
  sub->add_option("--dim", a->dim, "Vector dimension (8..16384)")
      ->check(CLI::Range(8, 16384))
      ->capture_default_str();
  sub->add_option("--bits", a->bits,
                  "Comma list of bit widths, e.g. 1,2,3,4 or 2.5,3.5 (mse: fractional = channel "
                  "split; prod: total bits incl. the QJL bit; polar: angle bits of levels >= 2)")
      ->capture_default_str();
  sub->add_option("--samples", a->samples, "Number of random vectors (and queries)")
      ->check(CLI::Range(size_t{2}, size_t{100000000}))
      ->capture_default_str();
  sub->add_option("--rotation", a->rotation, "hadamard | haar")
      ->check(CLI::IsMember({"hadamard", "haar"}))
      ->capture_default_str();
  sub->add_option("--sketch", a->sketch, "QJL sketch for prod: orth | gauss")
      ->check(CLI::IsMember({"orth", "gauss"}))
      ->capture_default_str();
  sub->add_option("--scale", a->scale, "Scale mode: norm | ls | matched")
      ->check(CLI::IsMember({"norm", "ls", "matched"}))
      ->capture_default_str();
  sub->add_option("--codebook", a->codebook, "Codebook law: exact | gauss")
      ->check(CLI::IsMember({"exact", "gauss"}))
      ->capture_default_str();
  sub->add_option("--seed", a->seed, "Seed for data, rotation and sketch")->capture_default_str();
  sub->add_option("--threads", a->threads, "Threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  sub->add_option("--format", a->formats,
                  "A format spec to measure as it is (repeatable; replaces --method/--bits/--rotation/--scale/"
                  "--codebook), e.g. --format q4_0:rot=hadamard --format tq-mse:b=4");
  sub->add_flag("--json", a->json, "Print one JSON array of objects");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
