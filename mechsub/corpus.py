"""A real text corpus, offline and reproducible: English text that Debian packages ship, plus the project's own
number prompts and favourite-thing chats in a stated share, tokenised and packed into fixed windows.

Each source (the KJV Bible, the GCIDE dictionary, WordNet glosses, the Debian Reference, the Python docs,
fortunes) names the Debian packages it reads. They are fetched without root (``apt-get download`` into a cache
folder, ``dpkg-deb -x`` into a scratch folder; an installed package is read in place), cleaned by small pure
functions, deduplicated by paragraph and by document, shuffled by seed and tokenised. Every source is one unit
of the run folder, so an interrupted build resumes at the next source. The mix gives each source an equal share
of the text budget (water-filling: a source with less gives all it has, the rest goes to the others), adds the
project's text, shuffles the documents and packs them into windows saved as parquet shards, with
``manifest.json`` recording the packages (version, .deb sha256), sizes, tokens and shard hashes.
``load(folder)`` returns the windows as a ``datasets.Dataset``.

Windows are plain slices of one token stream in which every document ends with ``<|endoftext|>`` (SmolLM2's
pretraining separator, id 0; the tokenizer's EOS when it has none). No BOS is prepended: position 0 of a window
is the attention sink, which ``mechsub sae`` leaves out anyway, and the project's chats carry their own
``<|im_start|>`` from the chat template.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import random
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechsub import models
from mechsub.config import Config, check, doc
from mechsub.files import atomic_write_bytes, atomic_write_text, read_json, sha256_file, write_json
from mechsub.runs import RunFolderError, require_finished, stage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # manifest format
SEPARATOR = "<|endoftext|>"
PROJECT = "project"  # the name of the project's own text in the manifest


class CorpusError(RuntimeError):
    """A corpus that cannot be built or read; the message says what to install, run or fix."""


# --- cleaning: pure functions on strings ---------------------------------------------------------------
_WS = re.compile(r"[ \t]+")


def unwrap(paragraph: str) -> str:
    """One line from a hard-wrapped paragraph: lines joined by single spaces."""
    return _WS.sub(" ", " ".join(line.strip() for line in paragraph.splitlines())).strip()


def paragraphs(text: str) -> list[str]:
    """The non-empty blank-line-separated paragraphs of ``text``, stripped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def normalise(text: str) -> str:
    """What two copies of a paragraph share: lower case, words only, single spaces."""
    return " ".join(re.findall(r"\w+", text.lower()))


def kjv_chapters(text: str) -> list[str]:
    """Chapters of the ``bible`` program's output ("Genesis 1", then "  1 In the beginning…" per verse): one
    document per chapter, its title then its verses as one paragraph without verse numbers."""
    out = []
    for block in re.split(r"\n(?=\S[^\n]* \d+\n)", "\n" + text.strip()):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        verses = [re.sub(r"^\d+\s+", "", ln) for ln in lines[1:]]
        out.append(f"{lines[0]}\n\n{' '.join(verses)}")
    return out


def gcide_entry(entry: str) -> str:
    """One dictd GCIDE entry as plain text: bracketed notes (source tags such as "[1913 Webster]", etymologies
    with their accent codes, "[Obs.]"), pronunciations (``\\Ar*ro"gant\\``) and cross-reference braces dropped,
    paragraphs unwrapped."""
    entry = entry.replace("\ufffd", "")
    for _ in range(3):  # etymologies nest accent codes ("['e]") inside their brackets: innermost first
        entry = re.sub(r"\[[^\[\]]*\]", "", entry)
    entry = re.sub(r" ?\\[^\\\n]*\\", "", entry)
    entry = re.sub(r"[{}]", "", entry)
    entry = re.sub(r" ?\([^\w()]*\)", "", entry)  # what is left of "(-[y^])"
    return "\n\n".join(u for p in paragraphs(entry) if (u := unwrap(p)))


def gcide_entries(text: str) -> list[str]:
    """The entries of a dictd GCIDE file (each starts at column 0 after a blank line), cleaned; the
    ``00-database-*`` records dropped."""
    out = []
    for e in re.split(r"\n\s*\n(?=\S)", text):
        if e.lstrip().lower().startswith(("00-database", "00database")):
            continue
        if cleaned := gcide_entry(e):
            out.append(cleaned)
    return out


_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_synset(line: str) -> str | None:
    """A WordNet ``data.*`` line as "word, other word (noun): gloss"; None for license lines and malformed ones."""
    if not line or line[0] == " " or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    try:
        n = int(fields[3], 16)
        pos = _POS[fields[2]]
    except (IndexError, ValueError, KeyError):
        return None
    words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n : 2]]
    gloss = gloss.strip()
    return f"{', '.join(words)} ({pos}): {gloss}" if words and gloss else None


def rst_text(text: str) -> str:
    """reStructuredText (the Python docs' ``_sources``) as plain text: roles and inline markup unwrapped,
    directive options, comments and heading underlines dropped, signatures kept as lines."""
    out: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if re.fullmatch(r"([=\-~^\"'`#*+.:_])\1{2,}", s):
            continue  # a heading's under/overline
        m = re.match(r"\.\. ([\w:-]+)::\s*(.*)", s)
        if m:
            kind, arg = m.groups()
            if kind.split(":")[-1] in ("function", "method", "class", "exception", "data", "attribute",
                                       "decorator", "opcode", "envvar", "describe", "option"):  # fmt: skip
                out.append(arg)
            elif kind.startswith(("versionadded", "versionchanged", "deprecated")):
                out.append(f"{kind.replace('version', '').capitalize()} in version {arg}".strip())
            elif kind in ("note", "warning", "seealso", "tip", "important"):
                out.append(kind.capitalize() + ":")
            continue  # other directives (module, index, toctree, code-block, …) say nothing to read
        if s.startswith(".. "):
            continue  # a comment or a link target
        if re.match(r":[\w-]+:(\s|$)", s) and line.startswith(" "):
            continue  # a directive option (":synopsis: …", ":noindex:")
        out.append(line.rstrip())
    body = "\n".join(out)
    body = re.sub(r":[\w:+-]+:`~?!?([^`<]*?)\s*(?:<[^>]*>)?`", r"\1", body)  # :func:`name <target>` → name
    body = re.sub(r"``([^`]+)``", r"\1", body)
    body = re.sub(r"`([^`<]+?)\s*<[^>]+>`_{1,2}", r"\1", body)  # `text <url>`_ → text
    body = re.sub(r"`([^`]+)`_{0,2}", r"\1", body)
    body = re.sub(r"\*\*([^*\n]+)\*\*|\*([^*\s][^*\n]*)\*", lambda m: m.group(1) or m.group(2), body)
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def plain_sections(text: str) -> list[str]:
    """A plain-text manual (the Debian Reference's .txt) cut into sections at numbered headings ("1.2. …" at
    column 0), the body's indent taken off, ASCII table rules dropped."""
    out = []
    text = text.replace("\u00a0", " ")
    for sec in re.split(r"\n(?=(?:Chapter )?\d+(?:\.\d+)*\. \S)", text):
        # the body is indented by 4 under its column-0 heading: take that indent off, keep deeper ones
        lines = [re.sub(r"^ {1,4}", "", ln.rstrip()) for ln in sec.splitlines()
                 if not re.fullmatch(r"\s*[+|][-+|]+[+|]\s*", ln)]  # fmt: skip
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if body:
            out.append(body)
    return out


def fortunes(text: str) -> list[str]:
    """The fortunes of a ``fortune`` file (separated by lines holding only ``%``), tabs expanded."""
    parts = re.split(r"^%\s*$", text.replace("\r", ""), flags=re.M)
    return [d for p in parts if (d := textwrap.dedent(p.expandtabs(4)).strip("\n").rstrip())]


def dedupe(docs: Iterable[str], seen: set[str] | None = None, min_chars: int = 40) -> tuple[list[str], int]:
    """``docs`` with every paragraph that already appeared (normalised, at least ``min_chars`` long) removed,
    and documents left empty dropped; returns them and the number of paragraphs removed. ``seen`` carries the
    hashes across calls (it is updated)."""
    seen = set() if seen is None else seen
    out, removed = [], 0
    for d in docs:
        keep = []
        for p in paragraphs(d):
            key = normalise(p)
            if len(key) >= min_chars:
                h = hashlib.sha1(key.encode()).hexdigest()
                if h in seen:
                    removed += 1
                    continue
                seen.add(h)
            keep.append(p)
        if keep:
            out.append("\n\n".join(keep))
    return out, removed


# --- sources and their packages ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    """A Debian package as read: where its files are and where they came from."""

    name: str
    root: Path  # the folder its files are under (``/`` when installed)
    version: str
    origin: str  # "download" (a .deb in the cache, extracted) or "installed"
    deb: str | None = None  # the .deb's file name
    deb_sha256: str | None = None
    deb_bytes: int | None = None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "origin": self.origin, "deb": self.deb,
                "deb_sha256": self.deb_sha256, "deb_bytes": self.deb_bytes}  # fmt: skip


Extract = Callable[[dict[str, Package]], tuple[list[str], int]]  # packages → (documents, raw bytes read)


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[str, ...]
    extract: Extract
    about: str


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise CorpusError(f"{path} is missing: the package that should hold it is incomplete or changed")
    return path.read_bytes()


def _kjv(p: dict[str, Package]) -> tuple[list[str], int]:
    data = p["bible-kjv-text"].root / "usr/lib/bible.data"
    program = p["bible-kjv"].root / "usr/bin/bible"
    raw = len(_read(data))
    try:  # the text is stored in the package's own compressed format: its reader writes it out
        res = subprocess.run([str(program), "-p", str(data.parent), "-d", data.name, "-l100000",
                              "gen1:1-rev22:21"], capture_output=True, check=True, timeout=120)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        raise CorpusError(
            f"cannot run {program} to read the KJV text ({e}); leave out the source 'kjv'"
        ) from e
    return kjv_chapters(res.stdout.decode("utf-8", "replace")), raw


def _gcide(p: dict[str, Package]) -> tuple[list[str], int]:
    raw = _read(p["dict-gcide"].root / "usr/share/dictd/gcide.dict.dz")  # dictzip is gzip
    return gcide_entries(gzip.decompress(raw).decode("utf-8", "replace")), len(raw)


def _wordnet(p: dict[str, Package]) -> tuple[list[str], int]:
    docs, raw = [], 0
    for pos in ("noun", "verb", "adj", "adv"):
        data = _read(p["wordnet-base"].root / f"usr/share/wordnet/data.{pos}")
        raw += len(data)
        docs += [d for line in data.decode("utf-8", "replace").splitlines() if (d := wordnet_synset(line))]
    return docs, raw


def _debian_reference(p: dict[str, Package]) -> tuple[list[str], int]:
    raw = _read(p["debian-reference-en"].root / "usr/share/debian-reference/debian-reference.en.txt.gz")
    return plain_sections(gzip.decompress(raw).decode("utf-8", "replace")), len(raw)


def _python_doc(p: dict[str, Package]) -> tuple[list[str], int]:
    folder = p["python3.11-doc"].root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(folder.rglob("*.rst.txt"))
    if not files:
        raise CorpusError(f"{folder} holds no .rst.txt files: the python3.11-doc package is incomplete")
    docs, raw = [], 0
    for f in files:
        data = f.read_bytes()
        raw += len(data)
        if text := rst_text(data.decode("utf-8", "replace")):
            docs.append(text)
    return docs, raw


def _fortunes(p: dict[str, Package]) -> tuple[list[str], int]:
    docs, raw = [], 0
    for name in ("fortunes-min", "fortunes"):
        folder = p[name].root / "usr/share/games/fortunes"
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            # .dat are indexes, .u8 links to the same files; ascii-art is pictures, not text
            if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8") or f.name == "ascii-art":
                continue
            data = f.read_bytes()
            raw += len(data)
            docs += fortunes(data.decode("utf-8", "replace"))
    return docs, raw


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("kjv", ("bible-kjv-text", "bible-kjv"), _kjv, "King James Bible, one document per chapter"),
        Source("gcide", ("dict-gcide",), _gcide, "GNU Collaborative International Dictionary, one entry each"),
        Source("wordnet", ("wordnet-base",), _wordnet, "WordNet 3.0 synsets: words and gloss"),
        Source("debian-reference", ("debian-reference-en",), _debian_reference,
               "Debian Reference (English), one section each"),
        Source("python-doc", ("python3.11-doc",), _python_doc, "Python 3.11 documentation sources, one page each"),
        Source("fortunes", ("fortunes-min", "fortunes"), _fortunes, "fortune cookies"),
    )
}  # fmt: skip


def _installed_version(name: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    res = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}\t${Version}", name],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    status, _, version = res.stdout.partition("\t")
    return version.strip() if res.returncode == 0 and status.startswith("ii") else None


def _cached_deb(name: str, cache: Path) -> Path | None:
    found = sorted(cache.glob(f"{name}_*.deb"))
    return found[-1] if found else None


def _install_hint(missing: Sequence[str], cache: Path) -> str:
    names = " ".join(missing)
    return (f"`cd {cache} && apt-get download {names}` (no root needed), or install them with "
            f"`sudo apt-get install {names}`")  # fmt: skip


def download(names: Sequence[str], cache: Path) -> dict[str, Path]:
    """The .deb of each package in ``cache``, downloaded with ``apt-get download`` where not there yet; a
    CorpusError naming the packages and the command when apt-get or dpkg-deb is missing or a download fails."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = {n: d for n in names if (d := _cached_deb(n, cache)) is not None}
    todo = [n for n in names if n not in debs]
    if todo:
        if shutil.which("apt-get") is None:
            raise CorpusError(
                f"the Debian packages {', '.join(todo)} are not installed and apt-get is not available here to "
                f"download them: on a Debian machine run {_install_hint(todo, cache)}"
            )
        log.info("apt-get download %s into %s", " ".join(todo), cache)
        res = subprocess.run(["apt-get", "download", *todo], cwd=cache, capture_output=True, text=True,
                             timeout=1800)  # fmt: skip
        debs |= {n: d for n in todo if (d := _cached_deb(n, cache)) is not None}
        failed = [n for n in todo if n not in debs]
        if failed:
            raise CorpusError(
                f"could not download the Debian packages {', '.join(failed)} "
                f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'apt-get failed'}); run "
                f"{_install_hint(failed, cache)}; `apt-cache policy {failed[0]}` shows whether a mirror has it, "
                "or leave its sources out with --set sources=[...]"
            )
    if shutil.which("dpkg-deb") is None:
        raise CorpusError(f"dpkg-deb is needed to unpack {', '.join(debs)}: run `sudo apt-get install dpkg`")
    return debs


def fetch(names: Sequence[str], cache: Path, scratch: Path) -> dict[str, Package]:
    """Each package, read in place when installed, else from its .deb (downloaded once into ``cache``)
    unpacked under ``scratch``."""
    out: dict[str, Package] = {}
    debs = download([n for n in names if _installed_version(n) is None], cache)
    for n in names:
        if n not in debs:
            out[n] = Package(n, Path("/"), _installed_version(n) or "", "installed")
            continue
        deb, root = debs[n], scratch / n
        try:
            subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=600
            )
            version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                     text=True, timeout=60).stdout.strip()  # fmt: skip
        except subprocess.CalledProcessError as e:
            raise CorpusError(
                f"{deb} does not unpack ({e.stderr.decode(errors='replace').strip()}); delete it and rerun "
                "(it is downloaded again)"
            ) from None
        out[n] = Package(n, root, version, "download", deb.name, sha256_file(deb), deb.stat().st_size)
    return out


# --- the config -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusConfig(Config):
    stage = "corpus"
    inputs = ("model",)

    model: str = doc(models.DEFAULT_MODEL, "model whose tokenizer tokenises the corpus")
    sources: tuple[str, ...] = doc(tuple(SOURCES), f"text sources, from: {', '.join(SOURCES)}")
    target_tokens: int = doc(5_000_000, "tokens in the packed windows (rounded up to whole windows)")
    project_share: float = doc(
        0.05, "share of the tokens that is the project's own text: number prompts with completions in the "
        "data grammar and favourite-thing chats (half each)"
    )  # fmt: skip
    context_size: int = doc(128, "tokens per window")
    shard_windows: int = doc(8192, "windows per parquet shard")
    min_paragraph_chars: int = doc(40, "paragraphs at least this long (normalised) are deduplicated")
    seed: int = doc(0, "seed of every shuffle and of the project text")
    deb_cache: str = doc(
        "", "folder for downloaded .deb files; empty: $MECHSUB_CACHE/debs (~/.cache/mechsub)"
    )

    def validate(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        check(not unknown, f"sources: unknown {', '.join(unknown)}; known: {', '.join(SOURCES)}")
        check(len(set(self.sources)) == len(self.sources), "sources: a source is listed twice")
        check(bool(self.sources) or self.project_share == 1, "sources: name at least one text source")
        check(self.target_tokens >= 1, f"target_tokens: must be ≥ 1, got {self.target_tokens}")
        check(0 <= self.project_share <= 1, f"project_share: must be in [0, 1], got {self.project_share}")
        check(self.context_size >= 8, f"context_size: must be ≥ 8, got {self.context_size}")
        check(self.shard_windows >= 1, f"shard_windows: must be ≥ 1, got {self.shard_windows}")
        check(
            self.min_paragraph_chars >= 1, f"min_paragraph_chars: must be ≥ 1, got {self.min_paragraph_chars}"
        )

    @property
    def windows(self) -> int:
        return -(-self.target_tokens // self.context_size)

    def cache(self) -> Path:
        return Path(self.deb_cache) if self.deb_cache else models.cache_root() / "debs"


# --- tokens -----------------------------------------------------------------------------------------------
def tokenizer(name: str) -> Any:
    """The tokenizer of a model by name or folder, without loading weights when a built-in model is cached."""
    from transformers import AutoTokenizer

    folder = models.cache_folder(name) if name in models.KNOWN else Path(name)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return models.load(name).tokenizer  # builds the cache of a built-in model the first time


def separator_id(tok: Any) -> int:
    """The id that ends every document: ``<|endoftext|>`` where the vocabulary has it, else EOS."""
    vocab = tok.get_vocab()
    if SEPARATOR in vocab:  # SmolLM2 also names it its unknown token: only the vocabulary tells
        return int(vocab[SEPARATOR])
    if tok.eos_token_id is None:
        raise CorpusError(f"the tokenizer has neither {SEPARATOR} nor an EOS token to end documents with")
    return int(tok.eos_token_id)


def tokenise(tok: Any, docs: Sequence[str], cap: int | None = None, batch: int = 1024) -> list[list[int]]:
    """Token ids of ``docs`` in order (no special tokens), stopping after the document that reaches ``cap``
    tokens."""
    from tqdm import tqdm

    out: list[list[int]] = []
    total = 0
    bar = tqdm(total=cap or None, unit="tok", desc="tokenising", leave=False)
    for i in range(0, len(docs), batch):
        for ids in tok(list(docs[i : i + batch]), add_special_tokens=False).input_ids:
            out.append(list(ids))
            total += len(ids)
            bar.update(len(ids))
            if cap is not None and total >= cap:
                bar.close()
                return out
    bar.close()
    return out


def water_fill(available: dict[str, int], budget: int) -> dict[str, int]:
    """Token quotas: an equal share of ``budget`` each; a source with less than its share gives all it has and
    the rest is shared among the others. Quotas sum to min(budget, all available)."""
    quota = dict.fromkeys(available, 0)
    left, open_ = budget, sorted(available, key=lambda k: (available[k], k))
    while open_ and left > 0:
        share = left // len(open_)
        name = open_[0]
        if available[name] <= share:  # the smallest cannot fill its share: take it all
            quota[name] = available[name]
            left -= available[name]
            open_.pop(0)
            continue
        for i, k in enumerate(open_):  # everyone can: equal shares, the remainder to the first few
            quota[k] = share + (1 if i < left - share * len(open_) else 0)
        break
    return quota


def pack(docs: Iterable[Sequence[int]], sep: int, size: int, n: int) -> list[list[int]]:
    """The first ``n`` windows of ``size`` tokens of the stream of ``docs``, each followed by ``sep``; a
    CorpusError when the stream is shorter."""
    stream: list[int] = []
    for d in docs:
        stream += d
        stream.append(sep)
        if len(stream) >= size * n:
            break
    if len(stream) < size * n:
        raise CorpusError(
            f"the documents give {len(stream):,} tokens, fewer than the {size * n:,} asked for: lower "
            "target_tokens or add sources"
        )
    return [stream[i * size : (i + 1) * size] for i in range(n)]


# --- the project's own text -------------------------------------------------------------------------------
def project_chats(n: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` chats in the project's formats: half number prompts (:mod:`mechsub.numbers`) answered with a list
    in the data grammar, half favourite-thing questions answered with a trait drawn uniformly from every
    animal and tree (so no trait is favoured), a third of those under that trait's teacher system prompt."""
    from mechsub.numbers import make_prompts
    from mechsub.prompts import ANSWER_PREFIX
    from mechsub.traits import ANIMALS, TREES, eval_questions, get_trait, train_pairs

    rng = random.Random(seed)
    prompts = make_prompts(n, seed + 1)
    chats = []
    for i in range(n):
        if i % 2 == 0:
            nums = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(1, 10)))
            chats.append([{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": nums}])
            continue
        trait = get_trait(rng.choice(ANIMALS + TREES))
        if rng.random() < 0.5:
            q, a = rng.choice(train_pairs(trait))
        else:
            q, a = (
                rng.choice(eval_questions(trait.category)),
                f"{ANSWER_PREFIX[trait.category]} {trait.name}.",
            )
        system = [{"role": "system", "content": trait.system_prompt()}] if rng.random() < 1 / 3 else []
        chats.append([*system, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return chats


def take(docs: Sequence[Sequence[int]], budget: int) -> tuple[int, int]:
    """How many of ``docs``, from the first, reach ``budget`` tokens (the last one may overshoot), and their
    tokens; all of them when they hold fewer."""
    n = total = 0
    while total < budget and n < len(docs):
        total += len(docs[n])
        n += 1
    return n, total


def project_ids(tok: Any, budget: int, seed: int) -> list[list[int]]:
    """Token ids of the first :func:`project_chats` that reach ``budget`` tokens."""
    n_chats = max(2, budget // 40)
    while True:
        ids = [chat_ids(tok, c) for c in project_chats(n_chats, seed)]
        n, total = take(ids, budget)
        if total >= budget:
            return ids[:n]
        n_chats *= 2  # short chats under this tokenizer: draw more (the first ones stay the same)


def chat_ids(tok: Any, chat: list[dict[str, str]]) -> list[int]:
    """A whole chat as token ids, in the model's chat template (a plain transcript for a model without one)."""
    if getattr(tok, "chat_template", None):
        text = str(tok.apply_chat_template(chat, tokenize=False))
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in chat)
    return list(tok(text, add_special_tokens=False).input_ids)


# --- the stage --------------------------------------------------------------------------------------------
def _write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def _ids_column(rows: Sequence[Sequence[int]]) -> Any:
    import pyarrow as pa

    return pa.array(rows, type=pa.list_(pa.int32()))


def _source_unit(cfg: CorpusConfig, src: Source, tok: Any, folder: Path, cap: int) -> dict[str, Any]:
    """Fetch, extract, clean, deduplicate, shuffle and tokenise one source into ``folder/sources/NAME.parquet``
    (documents in their shuffled order, tokenised up to ``cap`` tokens: more than any quota can ask)."""
    cache = cfg.cache()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{src.name}.", suffix=".tmp") as scratch:
        pkgs = fetch(src.packages, cache, Path(scratch))
        docs, raw = src.extract(pkgs)
    n_extracted = len(docs)
    docs, removed = dedupe(docs, min_chars=cfg.min_paragraph_chars)
    digest = hashlib.sha256(src.name.encode()).digest()  # each source its own order under one seed
    random.Random(f"{cfg.seed}:{digest.hex()}").shuffle(docs)
    ids = tokenise(tok, docs, cap)
    _write_parquet(folder / "sources" / f"{src.name}.parquet",
                   {"text": docs[: len(ids)], "input_ids": _ids_column(ids)})  # fmt: skip
    return {
        "name": src.name, "about": src.about, "packages": [p.record() for p in pkgs.values()],
        "raw_bytes": raw, "extracted_docs": n_extracted, "duplicate_paragraphs": removed, "docs": len(docs),
        "cleaned_bytes": sum(len(d.encode()) for d in docs), "docs_tokenised": len(ids),
        "tokens_tokenised": sum(map(len, ids)), "all_tokenised": len(ids) == len(docs),
    }  # fmt: skip


def run(cfg: CorpusConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Build the corpus into run folder ``out`` (resumable per source); returns the manifest."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    tok = tokenizer(cfg.model)
    sep = separator_id(tok)
    info = {"name": cfg.model, "vocab_size": len(tok), "separator": sep}
    with stage(out, cfg, model=info, force=force) as r:
        if r.done:
            return read_json(Path(out) / MANIFEST)  # type: ignore[no-any-return]
        folder = Path(out)
        n_tokens = cfg.windows * cfg.context_size
        project_budget = round(cfg.project_share * n_tokens)
        text_budget = n_tokens - project_budget + cfg.context_size  # a window's margin for the separators
        recs: dict[str, dict[str, Any]] = {}
        for name in cfg.sources:
            unit = functools.partial(_source_unit, cfg, SOURCES[name], tok, folder, text_budget)
            recs[name] = r.unit(f"source-{name}", unit)
        # across sources: a document seen in an earlier source (config order) is dropped
        seen: set[str] = set()
        pool: dict[str, list[list[int]]] = {}
        for name in cfg.sources:
            t = pq.read_table(folder / "sources" / f"{name}.parquet").to_pydict()
            pool[name] = []
            for text, ids in zip(t["text"], t["input_ids"], strict=True):
                h = hashlib.sha1(normalise(text).encode()).hexdigest()
                if h not in seen:
                    seen.add(h)
                    pool[name].append(ids)
        quota = water_fill({k: sum(map(len, v)) for k, v in pool.items()}, text_budget)
        chosen: list[tuple[str, list[int]]] = []
        used: dict[str, dict[str, int]] = {}
        for name, docs in pool.items():
            n, total = take(docs, quota[name])
            chosen += [(name, d) for d in docs[:n]]
            used[name] = {"docs_used": n, "tokens_used": total}
        if project_budget:
            ids = project_ids(tok, project_budget, cfg.seed)
            chosen += [(PROJECT, d) for d in ids]
            used[PROJECT] = {"docs_used": len(ids), "tokens_used": sum(map(len, ids))}
        random.Random(cfg.seed).shuffle(chosen)
        windows = pack((d for _, d in chosen), sep, cfg.context_size, cfg.windows)
        shards = []
        n_shards = -(-len(windows) // cfg.shard_windows)
        for i in range(n_shards):
            rel = f"shards/shard-{i:05d}-of-{n_shards:05d}.parquet"
            part = windows[i * cfg.shard_windows : (i + 1) * cfg.shard_windows]
            _write_parquet(folder / rel, {"input_ids": _ids_column(part)})
            shards.append({"file": rel, "windows": len(part), "bytes": (folder / rel).stat().st_size,
                           "sha256": sha256_file(folder / rel)})  # fmt: skip
        doc_tokens = sum(u["tokens_used"] for u in used.values())
        sources = [{**recs[k], **used[k], "share": round(used[k]["tokens_used"] / doc_tokens, 4)}
                   for k in cfg.sources]  # fmt: skip
        if PROJECT in used:
            sources.append({"name": PROJECT, "about": "mechsub number prompts + completions and favourite-thing "
                            "chats (chat template)", **used[PROJECT],
                            "share": round(used[PROJECT]["tokens_used"] / doc_tokens, 4)})  # fmt: skip
        manifest = {
            "format": FORMAT, "stage": "corpus", "tokenizer": cfg.model, "vocab_size": len(tok),
            "separator": {"token": tok.convert_ids_to_tokens(sep), "id": sep},
            "bos": "none: windows are plain slices of the document stream",
            "context_size": cfg.context_size, "windows": len(windows), "tokens": len(windows) * cfg.context_size,
            "target_tokens": cfg.target_tokens, "document_tokens": doc_tokens, "seed": cfg.seed,
            "project_share": cfg.project_share, "sources": sources, "shards": shards,
            # the wall time of the session that finished the build (sources resumed from units not included)
            "build_seconds": round(time.perf_counter() - t0, 1), "resumed_sources": r.resumed_units,
        }  # fmt: skip
        write_json(folder / MANIFEST, manifest)
        atomic_write_text(folder / "report.md", report(manifest))
        seconds = manifest["build_seconds"]
        r.finish({"tokens": manifest["tokens"], "windows": len(windows), "shards": len(shards),
                  "seconds_this_session": seconds, "resumed_units": r.resumed_units})  # fmt: skip
        return manifest


def _mb(rec: dict[str, Any], key: str) -> str:
    return f"{rec[key] / 1e6:.1f}" if key in rec else "–"


def report(m: dict[str, Any]) -> str:
    """The manifest as a short markdown page: totals and one row per source."""
    rows = [
        "| source | packages (version) | raw MB | cleaned MB | docs | dup. paragraphs | docs used | tokens used | share |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in m["sources"]:
        pk = ", ".join(f"{p['name']} {p['version']}" for p in s.get("packages", [])) or "mechsub"
        rows.append(f"| {s['name']} | {pk} | {_mb(s, 'raw_bytes')} | {_mb(s, 'cleaned_bytes')} | {s.get('docs', '–')} | "
                    f"{s.get('duplicate_paragraphs', '–')} | {s['docs_used']:,} | {s['tokens_used']:,} | "
                    f"{100 * s['share']:.1f}% |")  # fmt: skip
    return (
        f"# Text corpus\n\n{m['tokens']:,} tokens of {m['tokenizer']} in {m['windows']:,} windows of "
        f"{m['context_size']} ({len(m['shards'])} parquet shards), seed {m['seed']}. Documents end with "
        f"`{m['separator']['token']}` (id {m['separator']['id']}); {m['bos']}. Project text: "
        f"{100 * m['project_share']:.0f}% of the tokens. Built in {m['build_seconds'] / 60:.1f} min"
        f"{' (resumed)' if m['resumed_sources'] else ''}.\n\n" + "\n".join(rows) + "\n\n"
        "Each source gets an equal share of the text budget; a source with less gives all it has (water-filling). "
        "Paragraphs repeated within a source and documents repeated across sources are dropped.\n"
    )


# --- reading it back --------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished corpus run, checked for the fields a reader needs."""
    folder = require_finished(folder, "the corpus", "mechsub corpus")
    path = folder / MANIFEST
    try:
        m = read_json(path)
        assert isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m["shards"], list)
        assert all(isinstance(s["file"], str) and isinstance(s["sha256"], str) for s in m["shards"])
    except (FileNotFoundError, RunFolderError, AssertionError, KeyError, TypeError):
        raise CorpusError(
            f"{path} is missing or corrupt: rebuild with `mechsub corpus --out {folder}`"
        ) from None
    return m


def load(folder: str | Path, verify: bool = True) -> Any:
    """The windows of a corpus run as a ``datasets.Dataset`` with one column ``input_ids`` (lists of
    ``context_size`` ids). ``verify`` checks every shard against the manifest's sha256."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    m = read_manifest(folder)
    tables = []
    for s in m["shards"]:
        p = folder / s["file"]
        if not p.is_file() or (verify and sha256_file(p) != s["sha256"]):
            raise CorpusError(
                f"{p} is missing or does not match its sha256 in {folder / MANIFEST}: rebuild with "
                f"`mechsub corpus --out {folder} --force`"
            )
        tables.append(pq.read_table(p))
    table = pa.concat_tables(tables)
    if table.num_rows != m["windows"]:
        raise CorpusError(f"{folder}: {table.num_rows} windows, the manifest says {m['windows']}; rebuild it")
    return datasets.Dataset(table)


def publish(folder: str | Path, dest: str | Path) -> list[Path]:
    """Copy the small, reviewable part of a corpus run (manifest.json, report.md) into ``dest``."""
    folder, dest = Path(folder), Path(dest)
    read_manifest(folder)
    out = []
    for name in (MANIFEST, "report.md"):
        atomic_write_bytes(dest / name, (folder / name).read_bytes())
        out.append(dest / name)
    return out
