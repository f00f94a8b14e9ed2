#include "turboquant/generate.hpp"

#include <chrono>

#include "turboquant/error.hpp"

namespace tq {
namespace {

// Length of the longest prefix of s made of complete UTF-8 characters.
size_t complete_utf8(const std::string& s) {
  size_t i = s.size();
  int back = 0;
  while (i > 0 && back < 4) {
    const unsigned char c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte or ASCII
      const int need = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
      return back + 1 >= need ? s.size() : i - 1;
    }
    --i;
    ++back;
  }
  return s.size();  // not UTF-8 anyway: let it through
}

}  // namespace

GenerateResult generate(const Model& model, const Tokenizer& tok, const std::string& prompt,
                        const GenerateOptions& o, const std::function<void(const std::string&)>& on_piece) {
  TQ_REQUIRE(o.max_tokens >= 0, "max_tokens must be >= 0, got ", o.max_tokens);
  TQ_REQUIRE(o.prefill_batch >= 1, "prefill_batch must be >= 1, got ", o.prefill_batch);
  GenerateResult r;
  r.prompt_tokens = o.chat ? tok.encode_chat({{"user", prompt}}, true)
                           : tok.encode(prompt, tok.add_bos_default() && tok.bos_id() >= 0);
  TQ_REQUIRE(!r.prompt_tokens.empty(), "the prompt encodes to no tokens");
  const ModelConfig& c = model.config();
  TQ_REQUIRE(int(r.prompt_tokens.size()) + o.max_tokens <= c.context_length, "prompt (",
             r.prompt_tokens.size(), " tokens) + ", o.max_tokens, " new tokens exceed the context length ",
             c.context_length);
  KvCacheConfig cc = model.cache_config(o.preset, o.swa_full);
  cc.k_start = o.k_start;
  cc.dense_window = o.dense_window;
  cc.dense_prefix = o.dense_prefix;
  cc.dense_layers = o.dense_layers;
  cc.validate();
  KvCache cache(cc);
  const int seq = cache.add_sequence();
  Sampler sampler(o.sampler);
  std::vector<float> logits(c.vocab);

  const auto t0 = std::chrono::steady_clock::now();
  int pos = 0;
  const int n_prompt = int(r.prompt_tokens.size());
  while (pos < n_prompt) {
    const int n = std::min(o.prefill_batch, n_prompt - pos);
    model.forward(cache, seq, r.prompt_tokens.data() + pos, n, pos, logits.data(), o.threads);
    pos += n;
  }
  const auto t1 = std::chrono::steady_clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  std::string pending;
  for (int i = 0; i < o.max_tokens; ++i) {
    const int32_t next = sampler.sample(logits.data(), c.vocab);
    if (o.stop_at_eog && tok.is_eog(next)) {
      r.stopped_at_eog = true;
      break;
    }
    r.tokens.push_back(next);
    pending += tok.token_piece(next);
    const size_t ok = complete_utf8(pending);
    if (ok > 0 && on_piece) on_piece(pending.substr(0, ok));
    pending.erase(0, ok);
    if (i + 1 == o.max_tokens) break;  // the last token needs no forward pass
    model.forward(cache, seq, &next, 1, pos++, logits.data(), o.threads);
  }
  if (!pending.empty() && on_piece) on_piece(pending);
  r.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  r.text = tok.decode(r.tokens);
  const KvMemoryReport m = cache.memory();
  r.kv_bytes = m.used.total();
  r.kv_bytes_dense = m.dense_equivalent;
  return r;
}

}  // namespace tq
