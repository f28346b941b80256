"""Tokenizers behind one small interface: text in, token ids out, plus the special ids that caption encoding and
masked-language-model corruption need.

A method names the tokenizer it trains with (IRRA and PHP: CLIP's byte-level BPE; IVT: BERT WordPiece; Bi-IRRA:
XLM-R SentencePiece). Everything downstream — caption encoding (:func:`encode_caption`), MLM masking, caches —
talks to a :class:`Tokenizer` only:

* ``encode(text)`` gives the content ids of a caption, without special tokens;
* ``specials`` gives ``pad``, ``bos`` (start), ``eos`` (end), ``mask`` and ``unk`` ids;
* ``random_token_range`` is the half-open id range that MLM draws random replacements from;
* ``fingerprint()`` identifies the vocabulary (caches of encoded captions are keyed by it).

A caption row is ``bos, ids…, eos`` followed by ``pad`` up to the text length; a caption that is too long keeps
its first ``length - 1`` tokens and ends with ``eos``.

:class:`ClipBpeTokenizer` gives exactly IRRA's ids. :class:`HuggingFaceTokenizer` adapts a ``transformers``
tokenizer read from a local folder (:func:`load_hf_tokenizer`).
"""
from __future__ import annotations

import abc
import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from utils.errors import UserError
from utils.simple_tokenizer import EOT_TOKEN, MASK_TOKEN, SOT_TOKEN, SimpleTokenizer


@dataclass(frozen=True)
class SpecialIds:
    """The ids of a tokenizer's special tokens (``unk`` is None where the vocabulary has no unknown token)."""

    pad: int
    bos: int
    eos: int
    mask: int
    unk: int | None = None

    def as_set(self) -> frozenset[int]:
        return frozenset(i for i in (self.pad, self.bos, self.eos, self.mask, self.unk) if i is not None)


class Tokenizer(abc.ABC):
    """Text to token ids, with the special ids the rest of the project needs (see the module docstring)."""

    #: Short name, stored in caches and logs (``clip_bpe``, ``wordpiece``, ``xlmr``).
    name: str = "tokenizer"

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (embedding tables and MLM heads are this size)."""

    @property
    @abc.abstractmethod
    def specials(self) -> SpecialIds:
        """Padding, start, end, mask and unknown ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Content ids of ``text`` (cleaned as the tokenizer does), without start/end tokens."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens are dropped where the underlying tokenizer does so)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short hex digest of everything that decides the ids (vocabulary files, cleaning version)."""

    @property
    def random_token_range(self) -> tuple[int, int]:
        """``[low, high)``: MLM's random replacements are drawn uniformly from these ids."""
        return 0, self.vocab_size

    def save(self, folder: str) -> bool:
        """Copy the files that define the vocabulary into ``folder`` (so a run can be evaluated with exactly the
        tokenizer it trained with); False when there is nothing to copy (a fixed, packaged vocabulary)."""
        return False

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never selected for masking (padding, start, end, mask, unknown)."""
        return self.specials.as_set()


class ClipBpeTokenizer(Tokenizer):
    """CLIP's byte-level BPE with IRRA's vocabulary: pad 0, ``<|mask|>`` 49405, start 49406, end 49407.

    MLM replaces with ids from ``[1, 49405)``, as IRRA does. ``bpe`` wraps an existing :class:`SimpleTokenizer`.
    """

    name = "clip_bpe"

    def __init__(self, bpe_path: str | os.PathLike | None = None, bpe: SimpleTokenizer | None = None) -> None:
        self.bpe = bpe if bpe is not None else SimpleTokenizer(bpe_path)
        enc = self.bpe.encoder
        self._specials = SpecialIds(pad=0, bos=enc[SOT_TOKEN], eos=enc[EOT_TOKEN], mask=enc[MASK_TOKEN])

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    @property
    def specials(self) -> SpecialIds:
        return self._specials

    @property
    def random_token_range(self) -> tuple[int, int]:
        return 1, self._specials.mask

    @property
    def encoder(self) -> dict[str, int]:
        """Token string -> id (IRRA code reads ``tokenizer.encoder['<|mask|>']``)."""
        return self.bpe.encoder

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        special = {self._specials.bos, self._specials.eos}
        return self.bpe.decode(i for i in ids if int(i) not in special and int(i) != self._specials.pad).strip()

    def fingerprint(self) -> str:
        # The merges decide every id; the table itself is fixed by the merges file.
        digest = hashlib.sha256(b"clip_bpe/irra-vocab/v1")
        for first, second in sorted(self.bpe.bpe_ranks, key=self.bpe.bpe_ranks.__getitem__):
            digest.update(f"{first} {second}\n".encode())
        return digest.hexdigest()[:16]


class HuggingFaceTokenizer(Tokenizer):
    """A ``transformers`` tokenizer (WordPiece, SentencePiece, …) behind :class:`Tokenizer`.

    Start/end are the tokenizer's ``cls``/``sep`` tokens when it has them (BERT: ``[CLS]``/``[SEP]``), else its
    ``bos``/``eos`` tokens (XLM-R: ``<s>``/``</s>``). MLM replacements are drawn from the ids after the last
    special id at the start of the vocabulary (BERT keeps ``[unused*]`` and special tokens there; XLM-R its four
    fairseq tokens), excluding the mask token when it sits at the end (XLM-R).

    Args:
        hf_tokenizer: a loaded ``transformers`` tokenizer.
        name: short name for caches and logs.
        files: the vocabulary files read to build it (hashed by :meth:`fingerprint`).
        clean: an optional caption-cleaning function applied before encoding.
    """

    def __init__(self, hf_tokenizer: Any, name: str, files: Sequence[str] = (), clean=None) -> None:
        self.hf = hf_tokenizer
        self.name = name
        self.files = tuple(files)
        self.clean = clean
        tok = hf_tokenizer
        bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        missing = [what for what, value in (("pad", tok.pad_token_id), ("start", bos), ("end", eos),
                                            ("mask", tok.mask_token_id)) if value is None]
        if missing:
            raise UserError(f"the {name} tokenizer has no {', '.join(missing)} token; a caption tokenizer needs "
                            f"pad, start, end and mask tokens (use the model's own tokenizer files)")
        self._specials = SpecialIds(pad=tok.pad_token_id, bos=bos, eos=eos, mask=tok.mask_token_id,
                                    unk=tok.unk_token_id)
        self._size = len(tok)
        if self._size <= len(self._specials.as_set()):
            raise UserError(f"the {name} tokenizer has only {self._size} ids, all of them special: its vocabulary "
                            f"file was not read (see docs/architecture.md, 'tokenizers')")

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def specials(self) -> SpecialIds:
        return self._specials

    @property
    def random_token_range(self) -> tuple[int, int]:
        special = self._specials.as_set() | set(getattr(self.hf, "all_special_ids", []))
        low = 0
        while low in special or self.hf.convert_ids_to_tokens(low).startswith("[unused"):
            low += 1
        high = self._size
        while high - 1 in special:
            high -= 1
        return low, high

    def save(self, folder: str) -> bool:
        os.makedirs(folder, exist_ok=True)
        for path in self.files:
            shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
        return bool(self.files)

    def encode(self, text: str) -> list[int]:
        if self.clean is not None:
            text = self.clean(text)
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.name}/{type(self.hf).__name__}/{self._size}".encode())
        for path in self.files:
            with open(path, "rb") as handle:
                digest.update(handle.read())
        return digest.hexdigest()[:16]


#: transformers class name and the vocabulary file it needs, per tokenizer kind.
HF_TOKENIZER_KINDS = {
    "wordpiece": ("BertTokenizer", "vocab.txt"),
    "xlmr": ("XLMRobertaTokenizer", "sentencepiece.bpe.model"),
}


def load_hf_tokenizer(kind: str, folder: str, clean=None) -> HuggingFaceTokenizer:
    """Read a ``wordpiece`` (BERT) or ``xlmr`` (XLM-R) tokenizer from a local folder holding its vocabulary file.

    The tokenizer is built with ``<Class>.from_pretrained(folder)``: in transformers 5 building it from the
    vocabulary file directly silently yields a few-id tokenizer that maps every word to the unknown token.

    Raises:
        UserError: unknown kind, missing folder or vocabulary file, or a tokenizer that cannot be built.
    """
    if kind not in HF_TOKENIZER_KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(HF_TOKENIZER_KINDS)}")
    class_name, vocab_file = HF_TOKENIZER_KINDS[kind]
    path = os.path.join(folder, vocab_file)
    if not os.path.isfile(path):
        raise UserError(f"tokenizer folder {folder} has no {vocab_file}; put the {kind} tokenizer files there "
                        f"(e.g. from the Hugging Face model page) or pass another --tokenizer_dir")
    import transformers  # heavy optional dependency: only the methods that use it pay for the import

    try:
        hf = getattr(transformers, class_name).from_pretrained(folder)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"cannot build the {kind} tokenizer from {folder} ({err})") from None
    return HuggingFaceTokenizer(hf, kind, files=[path], clean=clean)


def caption_tokens(text: str, tokenizer: Tokenizer) -> list[int]:
    """The ids of one caption, whole: start, content ids, end (its length says whether a text length cuts it)."""
    special = tokenizer.specials
    return [special.bos, *tokenizer.encode(text), special.eos]


def caption_row(tokens: list[int], tokenizer: Tokenizer, length: int, truncate: bool = True,
                text: str = "") -> torch.Tensor:
    """:func:`caption_tokens` as ``LongTensor[length]``: padded, or cut to its first ``length - 1`` tokens and the
    end token when ``truncate`` is true.

    Raises:
        UserError: ``length < 2``, or the caption is too long and ``truncate`` is false (``text`` names it).
    """
    if length < 2:
        raise UserError(f"text_length must be at least 2 (start and end tokens), got {length}; fix --text_length.")
    special = tokenizer.specials
    if len(tokens) > length:
        if not truncate:
            raise UserError(f"Caption is {len(tokens)} tokens long (with start/end tokens) but text_length is "
                            f"{length}: '{text[:80]}'. Raise --text_length or allow truncation.")
        tokens = tokens[:length]
        tokens[-1] = special.eos
    row = torch.full((length,), special.pad, dtype=torch.long)
    row[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return row


def encode_caption(text: str, tokenizer: Tokenizer, length: int, truncate: bool = True) -> torch.Tensor:
    """One caption as ``LongTensor[length]``: start, content ids, end, then padding.

    A caption longer than ``length`` (start and end included) keeps its first ``length - 1`` tokens and ends
    with the end token when ``truncate`` is true.

    Raises:
        UserError: ``length < 2``, or the caption is too long and ``truncate`` is false.
    """
    return caption_row(caption_tokens(text, tokenizer), tokenizer, length, truncate, text)


#: File name under which :func:`train_sentencepiece` saves its model (the name XLM-R's tokenizer reads).
SENTENCEPIECE_FILE = HF_TOKENIZER_KINDS["xlmr"][1]


def _is_cjk(char: str) -> bool:
    """Chinese/Japanese/Korean characters and full-width punctuation (text without spaces between words)."""
    return "\u2e80" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff" or "\uff00" <= char <= "\uffef"


def _spaced_cjk(text: str) -> str:
    """``text`` with a space on each side of every CJK character."""
    return "".join(f" {c} " if _is_cjk(c) else c for c in text)


def train_sentencepiece(captions: Sequence[str], folder: str | os.PathLike, vocab_size: int = 1000) -> str:
    """Train a small SentencePiece model on ``captions`` (any languages) and save it where ``load_hf_tokenizer``
    reads an XLM-R tokenizer: ``folder/sentencepiece.bpe.model``.

    The model is a unigram model like XLM-R's (``unk`` 0, ``<s>`` 1, ``</s>`` 2, no padding piece, NFKC
    normalisation), with every character of the captions in its vocabulary. Its candidate pieces are the
    space-separated words of the captions, and every Chinese (CJK) character is a word of its own: on a small
    corpus SentencePiece's own candidates split English words into letters and pairs, and glue whole template
    clauses of Chinese into single pieces. So English encodes mostly word by word and Chinese character by
    character. ``vocab_size`` is an upper bound: a small text supports fewer pieces and gets fewer. Training
    runs on one thread, so the same captions give the same file. Loaded with ``load_hf_tokenizer("xlmr",
    folder)`` it has ``pieces + 2`` ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the pieces, and
    ``<mask>`` last.

    Returns:
        ``folder`` (created if needed).

    Raises:
        UserError: no non-empty caption, ``vocab_size`` below the number of distinct characters plus 3, or the
            ``sentencepiece`` or ``protobuf`` package is missing.
    """
    texts = [" ".join(_spaced_cjk(c).split()) for c in captions if c.strip()]
    if not texts:
        raise UserError("cannot train a SentencePiece tokenizer: no non-empty caption was given")
    try:  # optional dependencies: only the SentencePiece tokenizers need them
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise UserError("training a SentencePiece tokenizer needs the sentencepiece and protobuf packages: "
                        "pip install sentencepiece protobuf") from None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SENTENCEPIECE_FILE)
    partial, seeds = path + ".partial", path + ".seeds"
    with open(seeds, "w", encoding="utf-8") as handle:  # piece <tab> score, most frequent first
        for piece, count in sorted(_seed_pieces(texts).items(), key=lambda item: (-item[1], item[0])):
            handle.write(f"{piece}\t{count}\n")
    try:
        with open(partial, "wb") as handle:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=handle, model_type="unigram",
                vocab_size=int(vocab_size), hard_vocab_limit=False, character_coverage=1.0,
                seed_sentencepieces_file=seeds, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                minloglevel=2,
            )
    except RuntimeError as err:
        os.remove(partial)
        first_line = str(err).splitlines()[0]
        raise UserError(f"cannot train a SentencePiece tokenizer with vocab_size {vocab_size} on {len(texts)} "
                        f"captions; it needs one id per distinct character plus 3 ({first_line})") from None
    finally:
        os.remove(seeds)
    model = sentencepiece_model_pb2.ModelProto()
    with open(partial, "rb") as handle:
        model.ParseFromString(handle.read())
    model.trainer_spec.seed_sentencepieces_file = ""  # a temporary path: equal captions must give equal bytes
    with open(partial, "wb") as handle:
        handle.write(model.SerializeToString())
    os.replace(partial, path)
    return os.fspath(folder)


def _seed_pieces(texts: Sequence[str]) -> dict[str, int]:
    """Candidate pieces and their counts: each space-separated word split where it changes between letters or
    digits and other characters (SentencePiece never lets a piece cross such a border), ``▁`` marking a word's
    start; pieces longer than SentencePiece's limit (16) are left out."""
    counts: dict[str, int] = {}
    for text in texts:
        for word in text.split():
            start = 0
            for end in range(1, len(word) + 1):
                if end == len(word) or word[end].isalnum() != word[end - 1].isalnum():
                    piece = ("\u2581" if start == 0 else "") + word[start:end]
                    if len(piece) <= 16:
                        counts[piece] = counts.get(piece, 0) + 1
                    start = end
    return counts


#: The special tokens of a WordPiece vocabulary built here, in id order.
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_wordpiece_vocab(captions: Iterable[str], folder: str, vocab_size: int) -> str:
    """Build an uncased BERT WordPiece vocabulary from ``captions``, write ``folder/vocab.txt``; returns ``folder``.

    The captions are normalised and split into words as BERT's tokenizer does (``tokenizers``' ``BertNormalizer``
    with lower-casing and accent stripping, and ``BertPreTokenizer``). The vocabulary is, in id order:
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4); every character seen, alone and as a ``##`` continuation
    (sorted), so any word made of seen characters is encoded without ``[UNK]``; then whole words, most frequent
    first (ties alphabetical), up to ``vocab_size`` ids in all. It is a pure function of the set of words and
    their counts: the same captions always give the same file (the ``tokenizers`` WordPiece trainer does not —
    its tie-breaking changes from run to run, measured — so a vocabulary rebuilt for evaluation could differ
    from the training one). The result loads with ``load_hf_tokenizer("wordpiece", folder)``; the file is
    written under a temporary name and renamed, so processes building it at once never read a partial file.

    Raises:
        UserError: no caption text, or ``vocab_size`` too small for the special tokens and the characters.
    """
    from tokenizers.normalizers import BertNormalizer  # optional dependency: only WordPiece vocabularies need it
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: dict[str, int] = {}
    for caption in captions:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption)):
            counts[word] = counts.get(word, 0) + 1
    if not counts:
        raise UserError("no caption text to build a WordPiece vocabulary from")
    chars = sorted({char for word in counts for char in word})
    base = [*WORDPIECE_SPECIALS, *chars, *(f"##{char}" for char in chars)]
    if vocab_size < len(base):
        raise UserError(f"a WordPiece vocabulary of these captions needs at least {len(base)} ids (5 special tokens "
                        f"and 2 per character seen), got vocab_size {vocab_size}")
    taken = set(base)
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in taken][: vocab_size - len(base)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(f"{token}\n" for token in base + words)
    os.replace(temporary, path)
    return folder
