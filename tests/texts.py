"""Texts that stress tokenizer alignment: leading spaces, newlines, runs of spaces, digits, emoji, CJK."""

HARD_TEXTS = [
    "Hello world",
    "  two leading spaces\n\nand newlines\t tabs",
    "runs    of     spaces",
    "digits 1234567890 and 3.14159",
    "emoji 🙂🚀 mixed🙂text",
    "日本語のテキスト。 中文",
    "Ωmega ✓ ünïcödé",
]
