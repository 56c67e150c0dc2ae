"""Produce engine/tests/fixtures/tokenizer_hf.json.

Token ids (add_special_tokens=False) and decode of >= 200 tricky strings, from the
HF `transformers` tokenizer built from the GGUF's own vocab/merges. The engine's
Rust BPE tokenizer must reproduce these ids exactly and decode them back.
"""
import transformers

from common import hf_tokenizer, meta, write_fixture

HAND = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n ", "\t\t\tx", "a\tb\tc",
    "Hello, world!", " Hello", "  Hello", "   leading spaces", "trailing spaces   ", "Hello\nworld",
    "line one\r\nline two\r\n", "mixed \t \n whitespace \r\n\t end", "word" + " " * 17 + "word",
    "\n" * 7 + "x", "x" + "\t" * 5, "  \n  \n  ",
    # contractions and casing
    "I'm", "you're", "he's", "we've", "they'll", "I'd", "don't", "DON'T", "Can't won't shan't",
    "It's John's book, isn't it?", "'tis", "rock 'n' roll", "O'Neil's", "I 'm", "the dogs' bones",
    "HELLO WORLD", "hELLo WoRLd", "camelCaseIdentifier", "snake_case_identifier", "SCREAMING_SNAKE",
    # numbers
    "0", "7", "42", "123", "1234", "12345", "123456789", "1234567890123456789012345",
    "3.14159", "-2.5e-10", "1,000,000", "1 000 000", "$19.99", "50%", "2024-03-15", "12:34:56",
    "0x1F3A", "0b1010", "v1.2.3", "192.168.0.1", "+1 (555) 123-4567", "1st 2nd 3rd 4th",
    "x1y2z3", "a1b22c333d4444",
    # punctuation runs
    "!!!", "???", "?!?!", "...", "……", "---", "===", "***", "~~~", "<<>>", "(((())))", "{{}}",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?", "Wait... what?!", "--flag=value", "#!/bin/bash", "// comment",
    "/* block */", "<!-- html -->", "a.b.c.d", "e.g., i.e., etc.", "«quoted»", "„Anführung“", "“smart” ‘quotes’",
    # chat markup
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n",
    "<|im_start|>assistant\n", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "text<|im_end|>more",
    " <|im_start|>user", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|im_start |>", "<im_start>", "<|unknown|>",
    # scripts
    "Grüße aus München", "façade naïve coöperate", "Ærøskøbing", "Zażółć gęślą jaźń", "Čeština řeřicha",
    "Привет, мир!", "Съешь же ещё этих мягких французских булок", "Γειά σου Κόσμε", "Ελληνικά",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "হ্যালো বিশ্ব", "வணக்கம்", "สวัสดีชาวโลก", "ສະບາຍດີ",
    "你好，世界", "我爱自然语言处理。", "こんにちは世界", "カタカナとひらがな", "東京タワー", "안녕하세요 세계",
    "Tiếng Việt có dấu", "Türkçe karakterler: ğüşıöç", "Ṡṫṙḁṅġḗ ḋḯḁċṙḭṫḭċṡ", "ქართული", "Հայերեն", "አማርኛ",
    "ᚠᚢᚦᚨᚱᚲ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙", "∀x ∈ ℝ: x² ≥ 0", "∑_{i=1}^{n} i = n(n+1)/2", "½ ¼ ¾ ⅓", "°C µm Ω ℃",
    "e\u0301", "\u00e9", "A\u030a", "\u200b", "zero\u200bwidth", "\u00a0nbsp", "\ufeffbom", "tab\u3000ideographic",
    # emoji
    "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🇫🇷🇯🇵", "❤️", "#️⃣", "I ❤️ Rust 🦀!",
    "emoji🙂in🙃text", "🤖 robots", "✅ done ❌ failed ⚠️ warn",
    # code
    "def foo(x):\n    return x * 2\n",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "const add = (a, b) => a + b;\nconsole.log(add(1, 2));",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if __name__ == \"__main__\":\n    main()",
    "<div class=\"container\"><p>Hi</p></div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "    indented four\n        indented eight\n",
    "let v: Vec<u32> = (0..10).map(|x| x * x).collect();",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "public static void main(String[] args) {}",
    "echo $HOME && ls -la | grep '^d' > out.txt 2>&1",
    "\\begin{equation} E = mc^2 \\end{equation}",
    "# Title\n\n- item 1\n- item 2\n\n```python\nprint(1)\n```",
    "https://example.com/path?query=1&other=two#frag", "user@example.com", "C:\\Users\\name\\file.txt",
    # prose
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far, far away, there lived a curious little robot.",
    "It was the best of times, it was the worst of times.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "SmolLM2 is a family of compact language models.",
    "Transformers use self-attention to model long-range dependencies.",
]


def generated():
    out = []
    out += ["9" * k for k in range(1, 13)]                   # digit runs
    out += [" " * k + "x" for k in range(1, 9)]              # leading space runs
    out += ["a" + " " * k + "b" for k in (2, 3, 4, 8, 16)]
    out += ["\n" * k for k in (3, 4, 5)]
    out += ["a" * k for k in (2, 3, 5, 8, 16, 33)]            # repeated letters
    out += ["." * k for k in (2, 4, 6, 10)]
    out += ["ab" * k for k in (3, 10)]
    out += [str(2 ** k) for k in (10, 20, 32, 64)]
    out += ["😀" * k for k in (2, 5)]
    return out


def main():
    tok = hf_tokenizer()
    strings = list(dict.fromkeys(HAND + generated()))        # dedupe, keep order
    assert len(strings) >= 200, len(strings)
    cases = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False)
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
    write_fixture("tokenizer_hf.json", {
        "meta": meta("transformers AutoTokenizer (GGUF)", transformers.__version__, __file__,
                     tokenizer_class=type(tok).__name__, add_special_tokens=False,
                     count=len(cases)),
        "cases": cases,
    })


if __name__ == "__main__":
    main()
