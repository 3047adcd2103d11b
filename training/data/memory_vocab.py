"""The built-in memory-task corpus's vocabulary: what its config checks (data/config.py) and its
generator (memory_tasks.py) both need, torch-free, so neither imports the other for it."""

MAX_ALPHABET = 32
MAX_FILLER = 16
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MARKERS = {"copy": "<copy>", "reverse": "<reverse>", "associative_retrieval": "<assoc>"}
VOCAB = (SPECIAL_TOKENS + list(MARKERS.values()) + ["<sep>", "<ans>"]
         + [f"s{i}" for i in range(MAX_ALPHABET)] + [f"f{i}" for i in range(MAX_FILLER)])
