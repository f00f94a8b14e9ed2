// Text <-> token ids for the models we run, built from a GGUF file's
// tokenizer.* metadata. Two families:
//  - "gpt2": byte-level BPE (SmolLM2). Text is split by the pre-tokenizer the
//    file names (tokenizer.ggml.pre), bytes are spelled with GPT-2's
//    byte-to-unicode alphabet, and merges apply by rank.
//  - "llama": SentencePiece BPE (Gemma 3). Spaces become "▁", pieces merge by
//    score, characters missing from the vocabulary fall back to <0xNN> tokens.
// Any other tokenizer.ggml.model gives tq::Error naming it.
//
//   auto f = tq::gguf::File::open("gemma-3-270m-q4_k_m.gguf");
//   auto tok = tq::Tokenizer::from_gguf(f);
//   std::vector<int32_t> ids = tok.encode_chat({{"user", "Hi!"}}, /*add_generation_prompt=*/true);
//   // ... generate; stream each new id with tok.token_piece(id) until tok.is_eog(id)
//   std::string text = tok.decode(ids);
//
// Special tokens: control tokens (<|im_start|>, <start_of_turn>, <bos>, ...)
// are recognised in text only with parse_special = true; user-defined tokens
// (Gemma's "\n\n", runs of spaces, <table>, ...) are always matched whole, as
// in llama.cpp. decode() writes every token's text, control tokens included,
// so decode(encode(s, false, true)) == s for valid UTF-8 s.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tq {

namespace gguf {
class File;
}

class Tokenizer {
 public:
  enum class Kind { byte_bpe, sentencepiece };
  // The chat format apply_chat_template writes.
  enum class ChatFormat { none, chatml, gemma };
  // As stored in tokenizer.ggml.token_type (llama.cpp's numbering).
  enum class TokenType : uint8_t {
    undefined = 0, normal = 1, unknown = 2, control = 3, user_defined = 4,
    unused = 5, byte = 6,
  };
  using Message = std::pair<std::string, std::string>;  // role, content

  static Tokenizer from_gguf(const gguf::File& file);

  // No BOS unless add_bos. parse_special: control tokens written literally in
  // text map to their ids (use it for chat-template output, not for user text).
  std::vector<int32_t> encode(std::string_view text, bool add_bos,
                              bool parse_special = false) const;
  // Concatenated token texts; throws tq::Error on an id outside [0, vocab_size).
  std::string decode(const std::vector<int32_t>& ids) const;
  // The raw bytes one token stands for. For byte-level BPE and byte-fallback
  // tokens this may be part of a UTF-8 character: concatenate before printing.
  // Unlike decode(), never strips the SentencePiece prefix space.
  std::string token_piece(int32_t id) const;

  // The prompt text of a conversation in the model's chat format, with special
  // tokens written out (Gemma's includes "<bos>"): encode it with
  // add_bos = false, parse_special = true, as encode_chat does.
  // Roles: "system", "user", "assistant" (Gemma writes "assistant" as "model").
  std::string apply_chat_template(const std::vector<Message>& messages,
                                  bool add_generation_prompt) const;
  std::vector<int32_t> encode_chat(const std::vector<Message>& messages,
                                   bool add_generation_prompt) const;

  Kind kind() const;
  ChatFormat chat_format() const;
  int32_t vocab_size() const;
  int32_t bos_id() const;  // -1 when the file names none
  int32_t eos_id() const;  // -1 when the file names none
  bool add_bos_default() const;  // tokenizer.ggml.add_bos_token
  // End of generation: eos, and the end-of-turn token of the chat format
  // (<|im_end|> for ChatML, <end_of_turn> for Gemma), eot/eom ids in the file.
  bool is_eog(int32_t id) const;
  TokenType token_type(int32_t id) const;  // throws on a bad id
  const std::string& token_text(int32_t id) const;  // as stored; throws on a bad id
  int32_t find_token(std::string_view text) const;  // exact stored text, or -1

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;  // immutable, so copies share it
};

}  // namespace tq
