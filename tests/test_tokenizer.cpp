// tq::Tokenizer against golden ids from independent implementations
// (scripts/make_tokenizer_golden.py: HF tokenizers for SmolLM2, sentencepiece
// and HF tokenizers for Gemma 3), plus round trips, special tokens, chat
// templates and hostile input. The model files are found in $TQ_MODEL_DIR
// (default $HOME/.cache/turboquant/models); tests that need one skip, naming
// it, when it is absent. The synthetic-vocabulary tests need no files.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/gguf.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq {
namespace {

constexpr const char* kSmolFile = "SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr const char* kGemmaFile = "gemma-3-270m-q4_k_m.gguf";

std::string model_dir() {
  if (const char* d = std::getenv("TQ_MODEL_DIR"); d && *d) return d;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/turboquant/models";
}

// One tokenizer per model file, loaded once; null when the file is absent.
const Tokenizer* load(const std::string& file) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto it = cache.find(file);
  if (it != cache.end()) return it->second.get();
  const std::string path = model_dir() + "/" + file;
  std::unique_ptr<Tokenizer> tok;
  if (std::filesystem::exists(path)) {
    tok = std::make_unique<Tokenizer>(Tokenizer::from_gguf(gguf::File::open(path)));
  }
  return cache.emplace(file, std::move(tok)).first->second.get();
}

#define TQ_LOAD_OR_SKIP(var, file)                                                     \
  const Tokenizer* var = load(file);                                                   \
  if (!var) {                                                                          \
    GTEST_SKIP() << "model file " << model_dir() << "/" << file                        \
                 << " not found; set TQ_MODEL_DIR to the folder holding " << file;     \
  }

struct GoldenCase {
  int line;
  std::string text;
  std::vector<int32_t> ids;
};

std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 >= s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    if (c == 'n') out += '\n';
    else if (c == 't') out += '\t';
    else if (c == 'r') out += '\r';
    else if (c == 'x' && i + 2 < s.size()) {
      out += char(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else out += c;
  }
  return out;
}

std::vector<GoldenCase> read_golden(const std::string& name) {
  const std::string path = std::string(TQ_TEST_DATA_DIR) + "/" + name;
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  std::vector<GoldenCase> cases;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line[0] == '#') continue;
    const size_t tab = line.find('\t');
    if (tab == std::string::npos) continue;
    GoldenCase c{n, unescape(line.substr(0, tab)), {}};
    std::istringstream ids(line.substr(tab + 1));
    for (int32_t id; ids >> id;) c.ids.push_back(id);
    cases.push_back(std::move(c));
  }
  EXPECT_GT(cases.size(), 20u) << path;
  return cases;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

void check_golden(const Tokenizer& tok, const std::string& file) {
  for (const GoldenCase& c : read_golden(file)) {
    const std::vector<int32_t> got = tok.encode(c.text, /*add_bos=*/false, /*parse_special=*/true);
    EXPECT_EQ(got, c.ids) << file << ":" << c.line << " text [" << c.text << "]\n  got  "
                          << show(got) << "\n  want " << show(c.ids);
    // Every token's text is exact (no prefix space in these files), so the
    // round trip is exact too.
    EXPECT_EQ(tok.decode(got), c.text) << file << ":" << c.line;
    std::string streamed;
    for (int32_t id : got) streamed += tok.token_piece(id);
    EXPECT_EQ(streamed, c.text) << file << ":" << c.line;
  }
}

// ---- SmolLM2: byte-level BPE --------------------------------------------------

TEST(TokenizerSmolLM2, GoldenIds) {
  TQ_LOAD_OR_SKIP(tok, kSmolFile);
  check_golden(*tok, "tokenizer_smollm2.txt");
}

TEST(TokenizerSmolLM2, Metadata) {
  TQ_LOAD_OR_SKIP(tok, kSmolFile);
  EXPECT_EQ(tok->kind(), Tokenizer::Kind::byte_bpe);
  EXPECT_EQ(tok->vocab_size(), 49152);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_FALSE(tok->add_bos_default());
  EXPECT_TRUE(tok->is_eog(2));  // <|im_end|> is also eos here
  EXPECT_TRUE(tok->is_eog(tok->find_token("<|im_end|>")));
  EXPECT_TRUE(tok->is_eog(tok->find_token("<|endoftext|>")));
  EXPECT_FALSE(tok->is_eog(1));
  EXPECT_FALSE(tok->is_eog(tok->find_token("Hello")));
}

TEST(TokenizerSmolLM2, SpecialTokensOnlyWhenAsked) {
  TQ_LOAD_OR_SKIP(tok, kSmolFile);
  const std::string text = "<|im_start|>user";
  EXPECT_EQ(tok->encode(text, false, true), (std::vector<int32_t>{1, 4093}));
  const std::vector<int32_t> plain = tok->encode(text, false, false);
  EXPECT_GT(plain.size(), 2u);
  for (int32_t id : plain) EXPECT_EQ(tok->token_type(id), Tokenizer::TokenType::normal);
  EXPECT_EQ(tok->decode(plain), text);
  EXPECT_EQ(tok->encode("hi", true), (std::vector<int32_t>{1, tok->encode("hi", false)[0]}));
}

TEST(TokenizerSmolLM2, ChatTemplate) {
  TQ_LOAD_OR_SKIP(tok, kSmolFile);
  EXPECT_EQ(tok->chat_format(), Tokenizer::ChatFormat::chatml);
  // No system turn: the template inserts SmolLM2's default one.
  const std::string got = tok->apply_chat_template({{"user", "Hello"}}, true);
  EXPECT_EQ(got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\n");
  const std::string with_system = tok->apply_chat_template(
      {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}}, false);
  EXPECT_EQ(with_system,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n");
  // Ids (from the golden reference for the same text, with specials parsed).
  const std::vector<int32_t> ids = tok->encode_chat({{"system", "Be brief."}, {"user", "Hello"}}, true);
  ASSERT_GE(ids.size(), 6u);
  EXPECT_EQ(ids.front(), 1);  // <|im_start|>, no BOS
  EXPECT_EQ(std::vector<int32_t>(ids.end() - 10, ids.end()),
            (std::vector<int32_t>{1, 4093, 198, 19556, 2, 198, 1, 520, 9531, 198}));
  EXPECT_EQ(tok->decode(ids), tok->apply_chat_template({{"system", "Be brief."}, {"user", "Hello"}}, true));
}

// ---- Gemma 3: SentencePiece BPE ----------------------------------------------------

TEST(TokenizerGemma3, GoldenIds) {
  TQ_LOAD_OR_SKIP(tok, kGemmaFile);
  check_golden(*tok, "tokenizer_gemma3.txt");
}

TEST(TokenizerGemma3, Metadata) {
  TQ_LOAD_OR_SKIP(tok, kGemmaFile);
  EXPECT_EQ(tok->kind(), Tokenizer::Kind::sentencepiece);
  EXPECT_EQ(tok->vocab_size(), 262144);
  EXPECT_EQ(tok->bos_id(), 2);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_TRUE(tok->add_bos_default());
  EXPECT_TRUE(tok->is_eog(1));
  EXPECT_TRUE(tok->is_eog(106));  // <end_of_turn>
  EXPECT_FALSE(tok->is_eog(105));
  EXPECT_EQ(tok->token_text(106), "<end_of_turn>");
}

TEST(TokenizerGemma3, SpecialAndUserDefinedTokens) {
  TQ_LOAD_OR_SKIP(tok, kGemmaFile);
  EXPECT_EQ(tok->encode("<start_of_turn>", false, true), (std::vector<int32_t>{105}));
  const std::vector<int32_t> plain = tok->encode("<start_of_turn>", false, false);
  EXPECT_GT(plain.size(), 1u);
  EXPECT_EQ(tok->decode(plain), "<start_of_turn>");
  // User-defined tokens (newline runs) are matched whatever parse_special says.
  EXPECT_EQ(tok->encode("\n\n", false, false), (std::vector<int32_t>{108}));
  EXPECT_EQ(tok->encode("Hello world", true), (std::vector<int32_t>{2, 9259, 1902}));
}

TEST(TokenizerGemma3, ChatTemplate) {
  TQ_LOAD_OR_SKIP(tok, kGemmaFile);
  EXPECT_EQ(tok->chat_format(), Tokenizer::ChatFormat::gemma);
  EXPECT_EQ(tok->apply_chat_template({{"user", "Hi there"}}, true),
            "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n");
  EXPECT_EQ(tok->apply_chat_template(
                {{"system", "Be brief."}, {"user", "  Hi  "}, {"assistant", "Hello!"}}, false),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
            "<start_of_turn>model\nHello!<end_of_turn>\n");
  // Golden line 44 of tokenizer_gemma3.txt, after one BOS.
  EXPECT_EQ(tok->encode_chat({{"user", "Hi there"}}, true),
            (std::vector<int32_t>{2, 105, 2364, 107, 10979, 993, 106, 107, 105, 4368, 107}));
}

TEST(TokenizerGemma3, ByteFallback) {
  TQ_LOAD_OR_SKIP(tok, kGemmaFile);
  // SmolLM2 can spell "\x04" only by dropping it; Gemma has <0x04>.
  EXPECT_EQ(tok->decode(tok->encode("a\x04b", false)), "a\x04b");
  // A private-use character has no piece: it becomes its UTF-8 bytes.
  const std::string text = "\xEE\x80\x8B";  // U+E00B
  const std::vector<int32_t> ids = tok->encode(text, false);
  ASSERT_EQ(ids.size(), 3u);
  for (int32_t id : ids) EXPECT_EQ(tok->token_type(id), Tokenizer::TokenType::byte);
  EXPECT_EQ(tok->token_piece(ids[0]), "\xEE");
  EXPECT_EQ(tok->decode(ids), text);
}

// ---- both ----------------------------------------------------------------------------

class TokenizerBoth : public ::testing::TestWithParam<const char*> {};

TEST_P(TokenizerBoth, EmptyText) {
  TQ_LOAD_OR_SKIP(tok, GetParam());
  EXPECT_TRUE(tok->encode("", false).empty());
  EXPECT_EQ(tok->encode("", true), (std::vector<int32_t>{tok->bos_id()}));
  EXPECT_EQ(tok->decode({}), "");
}

TEST_P(TokenizerBoth, InvalidUtf8RoundTrips) {
  TQ_LOAD_OR_SKIP(tok, GetParam());
  const std::vector<std::string> texts = {
      std::string("\xFF\xFE", 2), "abc\x80xyz", "trunc\xE6\x97", "\xC0\xAF overlong",
      "\xED\xA0\x80 surrogate", std::string("nul\0byte", 8), "\xF4\x90\x80\x80 big"};
  for (const std::string& t : texts) {
    const std::vector<int32_t> ids = tok->encode(t, false);
    std::string spellable = t;
    if (tok->kind() == Tokenizer::Kind::byte_bpe) {
      // SmolLM2's vocabulary cannot spell some bytes (0xC0, 0xFE, 0xFF, ...):
      // they are dropped, as in llama.cpp. Every other byte survives.
      spellable.clear();
      for (char c : t) {
        if (!tok->encode(std::string(1, c), false).empty()) spellable += c;
      }
    }
    EXPECT_EQ(ids.empty(), spellable.empty()) << show(ids);
    EXPECT_EQ(tok->decode(ids), spellable) << show(ids);
    for (int32_t id : ids) EXPECT_FALSE(tok->is_eog(id)) << "[" << t << "] " << show(ids);
  }
}

TEST_P(TokenizerBoth, BadIdsThrow) {
  TQ_LOAD_OR_SKIP(tok, GetParam());
  EXPECT_THROW(tok->decode({-1}), Error);
  EXPECT_THROW(tok->decode({tok->vocab_size()}), Error);
  EXPECT_THROW(tok->token_piece(tok->vocab_size() + 5), Error);
  try {
    tok->decode({5, 1 << 30});
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1073741824"), std::string::npos) << e.what();
  }
}

TEST_P(TokenizerBoth, LongInputIsFast) {
  TQ_LOAD_OR_SKIP(tok, GetParam());
  // Long runs stress the merge queue (quadratic merging would take seconds).
  std::string text(20000, 'a');
  text += std::string(5000, ' ') + "end";
  const std::vector<int32_t> ids = tok->encode(text, false);
  EXPECT_LT(ids.size(), text.size() / 2);
  EXPECT_EQ(tok->decode(ids), text);
}

INSTANTIATE_TEST_SUITE_P(Models, TokenizerBoth, ::testing::Values(kSmolFile, kGemmaFile),
                         [](const auto& info) {
                           return std::string(info.param == kSmolFile ? "SmolLM2" : "Gemma3");
                         });

// ---- synthetic vocabularies (no model files needed) ----------------------------------

struct GgufWriter {
  std::vector<uint8_t> b;
  int n_kv = 0;
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
  }
  void kv_string(const std::string& k, const std::string& v) {
    str(k), put<uint32_t>(8), str(v), ++n_kv;
  }
  void kv_u32(const std::string& k, uint32_t v) { str(k), put<uint32_t>(4), put(v), ++n_kv; }
  void kv_strings(const std::string& k, const std::vector<std::string>& v) {
    str(k), put<uint32_t>(9), put<uint32_t>(8), put<uint64_t>(v.size());
    for (const auto& s : v) str(s);
    ++n_kv;
  }
  void kv_i32s(const std::string& k, const std::vector<int32_t>& v) {
    str(k), put<uint32_t>(9), put<uint32_t>(5), put<uint64_t>(v.size());
    for (int32_t x : v) put(x);
    ++n_kv;
  }
  void kv_f32s(const std::string& k, const std::vector<float>& v) {
    str(k), put<uint32_t>(9), put<uint32_t>(6), put<uint64_t>(v.size());
    for (float x : v) put(x);
    ++n_kv;
  }
  gguf::File file() const {
    std::vector<uint8_t> out;
    auto put32 = [&](uint32_t v) { for (int i = 0; i < 4; ++i) out.push_back(uint8_t(v >> (8 * i))); };
    auto put64 = [&](uint64_t v) { for (int i = 0; i < 8; ++i) out.push_back(uint8_t(v >> (8 * i))); };
    put32(0x46554747), put32(3), put64(0), put64(uint64_t(n_kv));
    out.insert(out.end(), b.begin(), b.end());
    return gguf::File::from_memory(std::move(out));
  }
};

TEST(TokenizerSynthetic, UnsupportedModelNamed) {
  GgufWriter w;
  w.kv_string("tokenizer.ggml.model", "bert");
  w.kv_strings("tokenizer.ggml.tokens", {"a", "b"});
  try {
    Tokenizer::from_gguf(w.file());
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'bert'"), std::string::npos) << e.what();
  }
}

TEST(TokenizerSynthetic, SentencePieceMergesByScore) {
  // Pieces: ▁, a, b, c, ab, bc, ▁ab + <0x..> for the bytes of "é".
  GgufWriter w;
  w.kv_string("tokenizer.ggml.model", "llama");
  std::vector<std::string> toks = {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a", "b", "c",
                                   "ab",    "bc",  "\xE2\x96\x81" "ab", "<0xC3>", "<0xA9>"};
  std::vector<float> scores = {0, 0, 0, -1, -2, -3, -4, -10, -5, -6, 0, 0};
  std::vector<int32_t> types = {2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 6, 6};
  w.kv_strings("tokenizer.ggml.tokens", toks);
  w.kv_f32s("tokenizer.ggml.scores", scores);
  w.kv_i32s("tokenizer.ggml.token_type", types);
  w.kv_u32("tokenizer.ggml.bos_token_id", 1);
  w.kv_u32("tokenizer.ggml.eos_token_id", 2);
  w.kv_u32("tokenizer.ggml.unknown_token_id", 0);
  const Tokenizer tok = Tokenizer::from_gguf(w.file());  // add_space_prefix defaults to true
  // "▁abc": bc (-5) beats ab (-10); then nothing joins ▁ + a + bc.
  EXPECT_EQ(tok.encode("abc", false), (std::vector<int32_t>{3, 4, 8}));
  // "▁ab": ab (-10) then ▁ab (-6).
  EXPECT_EQ(tok.encode("ab", true), (std::vector<int32_t>{1, 9}));
  EXPECT_EQ(tok.decode({9}), "ab");  // the prefix space is dropped again
  EXPECT_EQ(tok.token_piece(9), " ab");
  EXPECT_EQ(tok.encode("\xC3\xA9", false), (std::vector<int32_t>{3, 10, 11}));
  EXPECT_EQ(tok.encode("</s>", false, true), (std::vector<int32_t>{2}));
  EXPECT_EQ(tok.encode("z", false), (std::vector<int32_t>{3, 0}));  // no byte piece: unk
  EXPECT_THROW(tok.apply_chat_template({{"user", "x"}}, true), Error);
}

TEST(TokenizerSynthetic, ByteLevelMergesByRank) {
  GgufWriter w;
  w.kv_string("tokenizer.ggml.model", "gpt2");
  w.kv_string("tokenizer.ggml.pre", "smollm");
  // All 256 byte spellings, then merged tokens.
  std::vector<std::string> toks = {"<|endoftext|>"};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const uint32_t cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) s += char(cp);
    else s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
    toks.push_back(s);
  }
  const int32_t ab = int32_t(toks.size());
  toks.push_back("ab");
  toks.push_back("\xC4\xA0" "ab");  // "Ġab" = " ab"
  toks.push_back("12");             // never used: digits are split first
  std::vector<int32_t> types(toks.size(), 1);
  types[0] = 3;
  w.kv_strings("tokenizer.ggml.tokens", toks);
  w.kv_i32s("tokenizer.ggml.token_type", types);
  w.kv_strings("tokenizer.ggml.merges", {"a b", "\xC4\xA0 ab", "1 2"});
  w.kv_u32("tokenizer.ggml.eos_token_id", 0);
  const Tokenizer tok = Tokenizer::from_gguf(w.file());
  auto byte_id = [](char c) { return int32_t(1 + static_cast<unsigned char>(c)); };
  EXPECT_EQ(tok.encode("ab ab", false), (std::vector<int32_t>{ab, ab + 1}));
  EXPECT_EQ(tok.encode("12", false), (std::vector<int32_t>{byte_id('1'), byte_id('2')}));
  EXPECT_EQ(tok.encode("<|endoftext|>", false, true), (std::vector<int32_t>{0}));
  EXPECT_TRUE(tok.is_eog(0));
  EXPECT_EQ(tok.token_piece(byte_id(' ')), " ");
  EXPECT_EQ(tok.decode(tok.encode("x\xE6\x97\xA5 ab\n", false)), "x\xE6\x97\xA5 ab\n");
  // encode(add_bos) without a BOS id is a caller error.
  EXPECT_THROW(tok.encode("a", true), Error);
}

}  // namespace
}  // namespace tq
