"""Write a tiny OPT-style or T5-style tokenizer and processor files into a folder (random
checkpoints, tests).

The real blip2-opt-2.7b tokenizer has 50,266 tokens; tests that build a tiny random
Blip2ForConditionalGeneration need one with a few hundred, laid out the same way, so that both
transformers' `Blip2Processor.from_pretrained(folder)` and miniblip2's `load_processor(folder)`
load it as the same kind of tokenizer (a byte-level BPE `GPT2Tokenizer`) and agree on every id.

Layout (the same conventions as the real OPT files, CHECKPOINTS.md 1.3):
    0 <s>   1 <pad>   2 </s>   3 <unk>            fairseq order, as in OPT
    4 .. 259                                      the 256 byte-level characters (so any text
                                                  encodes, and "\n" is one token, "Ċ")
    260 .. vocab_size - 2                         merges trained on CORPUS below
    vocab_size - 1  <image>                       special added token: the model config sets
                                                  image_token_index = vocab_size - 1
BOS and EOS are both `</s>` (id 2), PAD is `<pad>` (id 1), exactly like the real files.
The built-in corpus supports vocab_size from 262 (a single merge) to 1250.

The T5 one (`build_tiny_t5_tokenizer`, for tiny blip2-flan-t5 checkpoints) is a SentencePiece-
style Unigram that transformers loads as a `T5Tokenizer`, laid out like blip2-flan-t5-xl's files:
    0 <pad>   1 </s>   2 <unk>   3 ▁                T5's order; no BOS, EOS appended
    4 .. 97                                         the 94 printable ASCII characters, so any
                                                    ASCII text encodes without <unk>
    98 .. vocab_size - 2 - E                        "▁word" pieces: the most frequent words of
                                                    CORPUS, so common words are one token
    vocab_size - 1 - E .. vocab_size - 2            E sentinels <extra_id_{E-1}> .. <extra_id_0>
    vocab_size - 1  <image>                         from added_tokens.json only, as in the real
                                                    files; image_token_index = vocab_size - 1
There is no Precompiled normalizer (it needs SentencePiece to build); the text stays as given.
"""

import json
import math
import re
import string
from collections import Counter
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, fairseq order as in OPT
IMAGE_TOKEN = "<image>"
BYTE_ALPHABET_SIZE = 256  # ByteLevel maps every byte to one printable character

# A small built-in English corpus: captions and VQA prompts like the ones BLIP-2 sees, so the
# merges look like real words. Deterministic: the same text gives the same merges every run.
CORPUS = """\
a woman sitting on the beach with her dog
a man riding a bicycle down a city street
two children playing with a red ball in the park
a cat sleeping on a wooden chair next to the window
a plate of food with rice, chicken and vegetables
a group of people standing around a kitchen table
an airplane flying over the mountains at sunset
a black and white photo of an old building
a train passing through a station in the snow
a bowl of fruit with apples, oranges and bananas
a young boy holding a kite on a windy day
a dog running across a green field of grass
a woman talking on her phone while walking
a living room with a couch, a television and a lamp
a bus parked on the side of the road
a little girl eating an ice cream cone
a horse standing in a fence next to a barn
a person surfing a large wave in the ocean
a pizza with cheese and tomatoes on a table
a bathroom with a white sink and a mirror
Question: what is the woman holding? Answer: a frisbee
Question: how many dogs are in the picture? Answer: two
Question: which city is this? Answer: it's not a city, it's a beach
Question: what color is the car? Answer: blue
Question: where is the cat sitting? Answer: on the sofa
Question: is it raining? Answer: no, the sky is clear
Question: what time of day is it? Answer: early morning
Question: what are the people doing? Answer: they are playing tennis
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow! How vexingly quick daft zebras jump.
In 2023, the museum opened 14 new rooms and welcomed 1,250,000 visitors.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
Photographs of streets, rivers, bridges, markets, gardens, harbours and villages.
Every morning the baker wakes before dawn, kneads the dough and lights the oven.
The weather forecast promised sunshine, but thunderstorms arrived in the afternoon.
Scientists measured temperatures, pressures and wind speeds across the northern hemisphere.
Bright yellow flowers bloomed along the narrow path that climbed towards the castle.
The orchestra rehearsed symphonies, concertos and overtures throughout the winter season.
Volunteers planted thousands of trees, repaired fences and cleaned beaches last summer.
A friendly waiter brought coffee, orange juice, pancakes, eggs and crispy bacon.
Engineers designed lighter bridges, quieter engines and more efficient solar panels.
Students visited libraries, laboratories, observatories and botanical gardens together.
The journalist interviewed farmers, fishermen, shopkeepers, teachers and firefighters.
Snow covered the rooftops while children built snowmen and threw snowballs outside.
Question: what kind of animal is shown? Answer: a giraffe eating leaves from a tall tree
Question: why is the man wearing a helmet? Answer: because he is riding a motorcycle
Question: what is written on the sign? Answer: stop, one way, parking only
a skateboarder performing a trick on a ramp under a cloudy sky
an elephant walking through shallow water with its calf
a laptop, a keyboard and a cup of coffee on an office desk
a sailboat drifting across a calm lake surrounded by pine forests
fresh vegetables, carrots, peppers, cucumbers and lettuce at a farmers market
a firefighter climbing a ladder towards a smoking window
Quietly, the gymnast balanced, twisted, jumped and landed perfectly.
Zookeepers photographed penguins, flamingos, kangaroos, leopards and hippopotamuses.
Hungry squirrels gathered acorns, walnuts and chestnuts beneath the maple branches.
"""


def build_tiny_tokenizer(folder, vocab_size: int | None = None, corpus: list[str] | None = None) -> int:
    """Write tokenizer.json, vocab.json, merges.txt, added_tokens.json, tokenizer_config.json
    and special_tokens_map.json for a byte-level BPE trained on `corpus` (default: CORPUS), of
    exactly `vocab_size` tokens, or with every merge the corpus yields if vocab_size is None.
    Returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_merges(None if vocab_size is None else vocab_size - 1,  # the last id is <image>
                                 CORPUS.splitlines() if corpus is None else corpus)
    tokenizer = opt_style_tokenizer(vocab, merges)
    vocab_size = len(vocab) + 1
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    tokenizer.save(str(folder / "tokenizer.json"))
    write_vocab_and_merges(folder, vocab, merges)
    write_json(folder / "added_tokens.json", {IMAGE_TOKEN: vocab_size - 1})
    write_json(folder / "special_tokens_map.json", special_tokens_map())
    write_json(folder / "tokenizer_config.json", tokenizer_config(vocab_size - 1))
    return vocab_size


# Byte-level BPE training with `tokenizers` (what GPT-2's merges were made with, in miniature).
def train_merges(size: int | None, corpus: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train on `corpus` until the vocabulary (specials + bytes + merges) has `size` tokens, or
    until no pair is left to merge if size is None."""
    smallest = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE + 1  # at least one merge
    if size is not None and size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest + 1} (4 specials, 256 bytes, "
                         f"one merge, <image>); got {size + 1}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size or 1 << 20, min_frequency=1, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = trained["vocab"]
    if size is not None and len(vocab) != size:
        raise ValueError(f"the corpus only yields {len(vocab) + 1} tokens; "
                         f"ask for a vocab_size of at most {len(vocab) + 1}, not {size + 1}")
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]


# The pipeline of the real tokenizer.json (and of transformers' GPT2Tokenizer.__init__).
def opt_style_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # The real file marks only <pad> and </s> as added special tokens (normalized=True);
    # <s> and <unk> are plain vocabulary entries there, so decoding does not skip them.
    tokenizer.add_special_tokens([AddedToken(t, normalized=True, special=True) for t in ("<pad>", "</s>")])
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    # OPT prepends </s> (id 2) as BOS and appends nothing.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B:1", special_tokens=[("</s>", 2)])
    return tokenizer


def write_vocab_and_merges(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    write_json(folder / "vocab.json", vocab)
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def special_tokens_map() -> dict:
    def token(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}
    return {"bos_token": token("</s>"), "eos_token": token("</s>"),
            "pad_token": token("<pad>"), "unk_token": token("</s>")}


def tokenizer_config(image_token_id: int) -> dict:
    def added(content, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_prefix_space": False,
        "added_tokens_decoder": {"1": added("<pad>", True), "2": added("</s>", True),
                                 str(image_token_id): added(IMAGE_TOKEN, False)},
        "bos_token": "</s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "Blip2Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "</s>",
    }


T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0..2, as in T5
T5_CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation  # 94


def build_tiny_t5_tokenizer(folder, vocab_size: int, extra_ids: int = 3) -> int:
    """Write tokenizer.json, added_tokens.json, tokenizer_config.json and special_tokens_map.json
    for a Unigram tokenizer of exactly `vocab_size` ids, the last being <image>, with `extra_ids`
    sentinels before it. Returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fixed = len(T5_SPECIAL_TOKENS) + 1 + len(T5_CHARACTERS) + extra_ids + 1  # + "▁" and <image>
    words = word_pieces(CORPUS)
    if not fixed <= vocab_size <= fixed + len(words):
        raise ValueError(f"with {extra_ids} sentinels, vocab_size must be {fixed}..{fixed + len(words)} "
                         f"(3 specials, ▁, {len(T5_CHARACTERS)} characters, the sentinels and <image>, then "
                         f"up to {len(words)} words); got {vocab_size}")
    words = words[:vocab_size - fixed]
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]  # T5's reverse order
    vocab = ([(t, 0.0) for t in T5_SPECIAL_TOKENS] + [("▁", -2.0)] + [(c, -20.0) for c in T5_CHARACTERS]
             + words + [(t, 0.0) for t in sentinels])  # [vocab_size - 1]: all but <image>
    tokenizer = t5_style_tokenizer(vocab, sentinels)
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size - 1
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "added_tokens.json", {IMAGE_TOKEN: vocab_size - 1})
    write_json(folder / "special_tokens_map.json", t5_special_tokens_map(sentinels))
    write_json(folder / "tokenizer_config.json", t5_tokenizer_config(sentinels))
    return vocab_size


# The words of `corpus` ("a", "the", "Question", ...), most frequent first, as "▁word" pieces
# with log-frequency scores, all above a single character's -20: a known word is one token.
def word_pieces(corpus: str) -> list[tuple[str, float]]:
    counts = Counter(re.findall(r"[A-Za-z]+", corpus))
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # ties: alphabetical
    return [("▁" + word, round(math.log(count / total), 6)) for word, count in ranked]


# The pipeline the real tokenizer.json describes (T5Tokenizer rebuilds most of it on load, as
# miniblip2 does, but both keep the vocabulary, scores and added tokens).
def t5_style_tokenizer(vocab: list[tuple[str, float]], sentinels: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t in T5_SPECIAL_TOKENS + sentinels])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return tokenizer


def t5_special_tokens_map(sentinels: list[str]) -> dict:
    return {"additional_special_tokens": sentinels, "eos_token": "</s>", "pad_token": "<pad>",
            "unk_token": "<unk>"}


# As blip2-flan-t5-xl's: no added_tokens_decoder, so transformers reads added_tokens.json.
def t5_tokenizer_config(sentinels: list[str]) -> dict:
    return {
        "additional_special_tokens": sentinels,
        "eos_token": "</s>",
        "extra_ids": len(sentinels),
        "model_max_length": 512,
        "pad_token": "<pad>",
        "processor_class": "Blip2Processor",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }


# The BERT one (`build_tiny_bert_tokenizer`, for tiny blip2-itm-vit-g checkpoints) is a WordPiece
# vocab.txt that transformers loads as a `BertTokenizer`, laid out like blip2-itm-vit-g's files:
#     0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP]   4 [MASK]
#     5 .. 30                         a .. z, so any lower-case word encodes without [UNK]
#     31 .. 56                        ##a .. ##z, the pieces that continue a word
#     57 .. vocab_size - 2            whole words of CORPUS, most frequent first
#     vocab_size - 1  [DEC]           BOS of BLIP's decoder, from added_tokens.json only, as there
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert_tokenizer(folder, vocab_size: int) -> int:
    """Write vocab.txt, added_tokens.json, special_tokens_map.json and tokenizer_config.json like
    blip2-itm-vit-g's (no tokenizer.json), with `vocab_size` ids in all ([DEC] last, so the
    Q-Former's vocab_size is `vocab_size`); returns the id of [DEC]."""
    letters = list(string.ascii_lowercase)
    fixed = BERT_SPECIAL_TOKENS + letters + ["##" + c for c in letters]
    if vocab_size < len(fixed) + 1:
        raise ValueError(f"vocab_size must be at least {len(fixed) + 1}")
    words = [w.lower() for w, _ in Counter(re.findall(r"[A-Za-z]+", CORPUS)).most_common()]
    words = [w for w in dict.fromkeys(words) if len(w) > 1][:vocab_size - 1 - len(fixed)]
    tokens = fixed + words
    if len(tokens) != vocab_size - 1:
        raise ValueError(f"the corpus has too few words for vocab_size {vocab_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    write_json(folder / "added_tokens.json", {"[DEC]": vocab_size - 1})
    write_json(folder / "special_tokens_map.json", {"bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]",
                                                     "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"})
    write_json(folder / "tokenizer_config.json", {  # blip2-itm-vit-g's, word for word
        "clean_up_tokenization_spaces": True, "cls_token": "[CLS]", "do_basic_tokenize": True,
        "do_lower_case": True, "mask_token": "[MASK]", "model_max_length": 512, "never_split": None,
        "pad_token": "[PAD]", "processor_class": "Blip2Processor", "sep_token": "[SEP]", "strip_accents": None,
        "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer", "truncation_side": "right",
        "unk_token": "[UNK]"})
    return vocab_size - 1


def build_tiny_processor_files(folder, image_size: int, num_query_tokens: int) -> None:
    """Write preprocessor_config.json and processor_config.json like blip2-opt-2.7b's, with a
    square `image_size` and `num_query_tokens` <image> tokens per image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "preprocessor_config.json", {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Blip2Processor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    })
    write_json(folder / "processor_config.json",
               {"num_query_tokens": num_query_tokens, "processor_class": "Blip2Processor"})


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
