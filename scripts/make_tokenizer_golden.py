#!/usr/bin/env python3
"""Writes tests/data/tokenizer_{smollm2,gemma3}.txt: golden token ids for tq::Tokenizer.

The ids come from implementations independent of ours:
  * HF `tokenizers` (Rust), built from the GGUF's own vocabulary and merges by
    transformers' GGUF tokenizer builders (transformers.integrations.gguf.
    gguf_tokenizer_mapping). We feed them the metadata read with the `gguf`
    package, because transformers' own GGUF reader needs torch.
    One correction: for pre = "smollm" transformers installs plain GPT-2
    ByteLevel splitting, but SmolLM2's tokenizer.json (and llama.cpp's "smollm"
    pre-tokenizer) first splits every digit on its own (Digits(individual_digits
    =True) then ByteLevel). We set that pre-tokenizer here.
  * For Gemma 3, a second reference: Google's `sentencepiece`, with a BPE
    ModelProto rebuilt from the GGUF (pieces, scores, types; identity
    normaliser, no dummy prefix, byte fallback). Both references must agree on
    every text or the script stops.

Usage: python3 scripts/make_tokenizer_golden.py [MODEL_DIR]   (default /tmp/models)
       python3 scripts/make_tokenizer_golden.py --unicode-tables
         prints the letter / number code point ranges pasted into
         src/model/tokenizer.cpp (from Python's unicodedata).
Needs: pip install gguf numpy transformers tokenizers sentencepiece protobuf

File format, one case per line: escaped text, TAB, ids separated by spaces.
Escapes: \\\\ \\n \\t \\r and \\xHH for other control bytes; all else raw UTF-8.
Encoding is done with special tokens recognised (parse_special) and no BOS.
"""
import os
import sys

import gguf
from tokenizers import pre_tokenizers

from transformers.integrations.gguf import gguf_tokenizer_mapping as gtm

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "tests", "data")

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   spaces   between    words",
    "     ",
    " ",
    "tabs\tand\ttabs\t\tdouble",
    "line one\nline two\n\nline four\n",
    "\n\n\nstarts with newlines",
    "windows\r\nline endings\r\n",
    "mixed \t \n whitespace \n\t ",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1,000,000",
    "A long number 98765432109876543210 end",
    "Year 2024, version v1.2.3, phone +1-555-0100",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00c5ngstr\u00f6m",
    "Espa\u00f1ol: \u00bfD\u00f3nde est\u00e1 la biblioteca?",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
    "\u4e2d\u6587\u5206\u8bcd\u6d4b\u8bd5\uff0c\u4f60\u597d\u4e16\u754c\uff01",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442 \u0438 \u0431\u0443\u043a\u0432\u044b",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0646\u0635",
    "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e",
    "Emoji: \U0001F600\U0001F680 \U0001F44D\U0001F3FD \U0001F468\u200D\U0001F469\u200D\U0001F467 \u2764\ufe0f",
    "Math: \u2211 x\u00b2 \u2264 \u221e, \u03b1\u03b2\u03b3 \u2192 \u03c0",
    "Rare: \U00010348 \U0001D11E \u2603 \u00a0nbsp",
    "def foo(x):\n    return x**2 + 1  # comment\n",
    "int main() { std::vector<int> v{1,2,3}; return v[0]; }",
    "if (a && b || !c) { x += 1; } else { y -= 2; }",
    "{\"key\": [1, 2, {\"nested\": null}], 'single': true}",
    "https://example.com/path?query=1&x=%20#frag",
    "email@example.org, @user #hashtag $100 50% ^_^ ~tilde`",
    "I'm, you're, they've, she'll, he'd, it's, we'RE, DON'T",
    "!!!??? ... --- *** ### ___",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "\t\tindented with tabs\n\t\t\tmore",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<table><tr><td>cell</td></tr></table>",
    "a<b>c</b>d <i>x</i>",
]

LONG_TEXT = (
    "Tokenizers split text into pieces. " * 3
    + "Mixed: caf\u00e9 \u65e5\u672c 12345 \U0001F600 end."
)
TEXTS.append(LONG_TEXT)


def escape(s: str) -> str:
    out = []
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or o == 0x7F:
            out.append("\\x%02x" % o)
        else:
            out.append(ch)
    return "".join(out)


def field_value(reader, name):
    f = reader.fields.get(name)
    if f is None:
        return None
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        sub = f.types[1] if len(f.types) > 1 else None
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def tokenizer_dict(path):
    r = gguf.GGUFReader(path)
    d = {}
    for key, name in gtm.GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        v = field_value(r, "tokenizer." + key)
        if v is not None:
            d[name] = v
    return field_value(r, "general.architecture"), d


def hf_tokenizer(path):
    arch, d = tokenizer_dict(path)
    backend, _ = gtm.convert_gguf_tokenizer(arch, d)
    if d.get("pre_tokenizer_type") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend, d


def spm_gemma(d):
    """sentencepiece BPE model rebuilt from the GGUF vocabulary."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len(d["tokens"])
    m.trainer_spec.unk_id = d["unk_token_id"]
    m.trainer_spec.bos_id = d["bos_token_id"]
    m.trainer_spec.eos_id = d["eos_token_id"]
    m.trainer_spec.pad_id = d["pad_token_id"]
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    types = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for tok, score, tt in zip(d["tokens"], d["scores"], d["token_type"]):
        p = m.pieces.add()
        # llama.cpp's converter wrote spaces for the whitespace pieces; spm wants "▁".
        p.piece = tok.replace(" ", "\u2581")
        p.score = score
        p.type = types[tt]
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(m.SerializeToString())
    return sp


def gemma_spm_encode(sp, d, text):
    # sentencepiece never matches CONTROL pieces in text; split them out first,
    # as the HF tokenizer does with special added tokens.
    controls = [t for t, tt in zip(d["tokens"], d["token_type"]) if tt == 3 and t.startswith("<")]
    ids = []
    i = 0
    seg = ""
    while i < len(text):
        hit = next((c for c in controls if text.startswith(c, i)), None) if text[i] == "<" else None
        if hit:
            if seg:
                ids += sp.encode(seg)
                seg = ""
            ids.append(d["tokens"].index(hit))
            i += len(hit)
        else:
            seg += text[i]
            i += 1
    if seg:
        ids += sp.encode(seg)
    return ids


def write(name, cases):
    path = os.path.join(OUT_DIR, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("# Generated by scripts/make_tokenizer_golden.py; do not edit.\n")
        f.write("# escaped text <TAB> token ids (special tokens parsed, no BOS)\n")
        for text, ids in cases:
            f.write(escape(text) + "\t" + " ".join(str(i) for i in ids) + "\n")
    print("wrote", path, len(cases), "cases")


def unicode_tables():
    import unicodedata

    def ranges(prefix):
        out, start = [], None
        for cp in range(0x110001):
            ok = cp < 0x110000 and unicodedata.category(chr(cp)).startswith(prefix)
            if ok and start is None:
                start = cp
            elif not ok and start is not None:
                out.append((start, cp - 1))
                start = None
        return out

    print("// Generated by scripts/make_tokenizer_golden.py --unicode-tables (Unicode %s)."
          % unicodedata.unidata_version)
    for name, prefix in (("kLetterRanges", "L"), ("kNumberRanges", "N")):
        rs = ranges(prefix)
        print("constexpr CodeRange %s[] = {" % name)
        line = " "
        for a, b in rs:
            item = " {0x%X, 0x%X}," % (a, b)
            if len(line) + len(item) > 96:
                print(line)
                line = " "
            line += item
        print(line)
        print("};")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--unicode-tables":
        unicode_tables()
        return
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/models"
    smol, _ = hf_tokenizer(os.path.join(model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    write("tokenizer_smollm2.txt",
          [(t, smol.encode(t, add_special_tokens=False).ids) for t in TEXTS])

    gemma, d = hf_tokenizer(os.path.join(model_dir, "gemma-3-270m-q4_k_m.gguf"))
    sp = spm_gemma(d)
    cases = []
    bad = 0
    for t in TEXTS:
        a = gemma.encode(t, add_special_tokens=False).ids
        b = gemma_spm_encode(sp, d, t)
        if a != b:
            bad += 1
            print("MISMATCH hf vs sentencepiece:", repr(t), "\n  hf ", a, "\n  spm", b)
        cases.append((t, b))
    write("tokenizer_gemma3.txt", cases)
    if bad:
        print(bad, "gemma texts disagree between references", file=sys.stderr)


if __name__ == "__main__":
    main()
