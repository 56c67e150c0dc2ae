"""Texts scored by the logprob oracles (logprobs_hf.py, logprobs_llamacpp.py).

Each must tokenize to 20..120 tokens; ChatML markup is parsed as special tokens.
"""

def chat(*turns):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


TEXTS = [
    # prose
    "The quick brown fox jumps over the lazy dog. This sentence contains every letter of the English "
    "alphabet, which is why it is often used to test typewriters and fonts.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter "
    "and his daughter. Every morning they walked together to the river to fetch water.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
    "produce glucose and oxygen. It takes place mainly in the leaves.",
    "The Industrial Revolution began in Britain in the late eighteenth century and spread to Europe and "
    "North America, transforming economies that had been based on agriculture and handicrafts.",
    "In machine learning, overfitting happens when a model learns the noise in its training data instead "
    "of the underlying pattern, so it performs poorly on new examples.",
    # code
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\nprint(fibonacci(10))\n",
    "fn main() {\n    let numbers = vec![3, 1, 4, 1, 5, 9, 2, 6];\n    let sum: i32 = numbers.iter().sum();\n"
    "    println!(\"sum = {}\", sum);\n}\n",
    "function debounce(fn, ms) {\n  let timer;\n  return (...args) => {\n    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn(...args), ms);\n  };\n}\n",
    "SELECT customers.name, COUNT(orders.id) AS order_count\nFROM customers\nLEFT JOIN orders ON "
    "orders.customer_id = customers.id\nGROUP BY customers.name\nORDER BY order_count DESC;\n",
    "#include <stdio.h>\n\nint main(void) {\n    for (int i = 1; i <= 5; i++) {\n        printf(\"%d squared is %d\\n\", i, i * i);\n"
    "    }\n    return 0;\n}\n",
    # chat
    chat(("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
         ("user", "What is the capital of France?"),
         ("assistant", "The capital of France is Paris.")),
    chat(("user", "Can you give me three tips for sleeping better?"),
         ("assistant", "Sure! 1. Keep a regular schedule. 2. Avoid screens before bed. 3. Keep your room cool and dark.")),
    chat(("system", "You are a concise assistant."),
         ("user", "Translate 'good morning' into Spanish."),
         ("assistant", "Buenos días."),
         ("user", "And into German?"),
         ("assistant", "Guten Morgen.")),
    chat(("user", "Write a haiku about autumn."),
         ("assistant", "Crimson leaves drifting\nwhispers of the cooling wind\nthe year exhales slow")),
    chat(("user", "If I have 3 apples and buy 5 more, then eat 2, how many do I have?"),
         ("assistant", "You start with 3, add 5 to get 8, then eat 2, leaving 6 apples.")),
    # numbers
    "The population grew from 1,234,567 in 1990 to 2,345,678 in 2020, an increase of about 90 percent "
    "over 30 years. In 2024 it reached 2,401,337.",
    "Pi is approximately 3.14159265358979, e is about 2.71828182845904, and the square root of two is "
    "1.41421356237309.",
    "Order #48213 shipped on 2023-11-07 at 14:32. Total: $1,249.99 (tax $99.50). Tracking: 1Z999AA10123456784.",
    # multilingual
    "Le petit prince est un livre écrit par Antoine de Saint-Exupéry. Il raconte l'histoire d'un jeune "
    "prince qui voyage de planète en planète.",
    "Die Katze schläft auf dem Sofa, während draußen der Regen gegen das Fenster prasselt. Es ist ein "
    "gemütlicher Sonntagnachmittag.",
    "El sol se pone detrás de las montañas y el cielo se tiñe de naranja y rosa. Los pájaros regresan a sus nidos.",
    "Москва — столица России и крупнейший город страны. 東京は日本の首都です。",
]
