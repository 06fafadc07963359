import gzip
import os
import stat
from pathlib import Path

import pytest

from mechsub import corpus
from mechsub.config import ConfigError
from mechsub.corpus import CorpusConfig, CorpusError, Package
from mechsub.runs import RunFolderError


# --- cleaners -----------------------------------------------------------------------------------------------
def test_kjv_chapters_drop_verse_numbers_and_keep_titles():
    text = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus the heavens.\n"
    assert corpus.kjv_chapters(text) == [
        "Genesis 1\n\nIn the beginning. And the earth.",
        "Genesis 2\n\nThus the heavens.",
    ]


def test_gcide_entry_strips_markup_and_unwraps():
    entry = (
        'Arrogant \\Ar"ro*gant\\, a. [F. arrogant, L. arrogans. See\n   {Arrogate}.]\n'
        "   1. Making exorbitant claims;\n      haughty.\n      [1913 Webster]\n\n"
        "   Syn: Magisterial; lordly. See {Magisterial}.\n        [1913 Webster]\n"
    )
    assert corpus.gcide_entry(entry) == (
        "Arrogant, a. 1. Making exorbitant claims; haughty.\n\nSyn: Magisterial; lordly. See Magisterial."
    )
    assert corpus.gcide_entry('Hatchery \\Hatch"er*y\\ (-[y^]), n. A house.') == "Hatchery, n. A house."


def test_gcide_entries_split_and_skip_database_records():
    text = '00-database-info\n   This is GCIDE.\n\nApple \\Ap"ple\\, n.\n   A fruit.\n\n   More.\n\nAx, n.\n   A tool.'
    assert corpus.gcide_entries(text) == ["Apple, n. A fruit.\n\nMore.", "Ax, n. A tool."]


def test_wordnet_synset_reads_words_and_gloss():
    line = "00005930 03 n 02 dwarf 0 small_person 1 001 @ 00004475 n 0000 | a plant or animal that is small  "
    assert corpus.wordnet_synset(line) == "dwarf, small person (noun): a plant or animal that is small"
    assert corpus.wordnet_synset("00001 00 s 01 big(a) 0 000 | large") == "big (adjective): large"
    assert corpus.wordnet_synset("  1 This software and database is licensed") is None
    assert corpus.wordnet_synset("garbage | no fields") is None


def test_rst_text_unwraps_roles_and_drops_directives():
    rst = (
        ":mod:`bisect` --- Array bisection\n==================\n\n.. module:: bisect\n   :synopsis: Bisect.\n\n"
        ".. function:: bisect_left(a, x)\n\n   Locate *x* in ``a``; see :func:`insort <bisect.insort>`.\n\n"
        ".. versionchanged:: 3.10\n   Added *key*.\n\n.. a comment\n"
    )
    assert corpus.rst_text(rst) == (
        "bisect --- Array bisection\n\nbisect_left(a, x)\n\n   Locate x in a; see insort.\n\n"
        "Changed in version 3.10\n   Added key."
    )


def test_plain_sections_split_at_numbered_headings_and_drop_table_rules():
    text = "Chapter 1. Intro\n\n    Hello\n    world.\n\n1.1.\u00a0Basics\n\n    +----+\n    |a|b |\n    +----+\n"
    assert corpus.plain_sections(text) == ["Chapter 1. Intro\n\nHello\nworld.", "1.1. Basics\n\n|a|b |"]


def test_fortunes_split_on_percent_lines():
    assert corpus.fortunes("One.\n\t-- A\n%\n\n%\nTwo\nlines.\n%\n") == ["One.\n    -- A", "Two\nlines."]


def test_dedupe_removes_repeated_paragraphs_keeps_short_ones_and_drops_empty_docs():
    long_a = "This paragraph is long enough to count as a duplicate when seen twice."
    docs = [f"Title\n\n{long_a}", f"Title\n\n{long_a.upper()}!", long_a, "Other text"]
    out, removed = corpus.dedupe(docs)
    assert out == [f"Title\n\n{long_a}", "Title", "Other text"] and removed == 2
    seen: set[str] = set()
    corpus.dedupe([long_a], seen)
    assert corpus.dedupe([long_a], seen) == ([], 1)


# --- mixing and packing ---------------------------------------------------------------------------------------
def test_water_fill_gives_small_sources_all_and_shares_the_rest():
    assert corpus.water_fill({"a": 10, "b": 100, "c": 100}, 100) == {"a": 10, "b": 45, "c": 45}
    assert corpus.water_fill({"a": 10, "b": 20}, 100) == {"a": 10, "b": 20}
    q = corpus.water_fill({"a": 50, "b": 50, "c": 50}, 100)
    assert sum(q.values()) == 100 and max(q.values()) - min(q.values()) <= 1


def test_pack_cuts_the_stream_with_separators():
    assert corpus.pack([[5, 6], [7]], sep=0, size=2, n=2) == [[5, 6], [0, 7]]
    with pytest.raises(CorpusError, match="lower target_tokens or add sources"):
        corpus.pack([[5, 6]], sep=0, size=4, n=2)


def test_tokenise_matches_the_tokenizer_and_stops_at_cap(tiny):
    tok = tiny.tokenizer
    ids = corpus.tokenise(tok, ["abc", "de", "fgh"], batch=2)
    assert ids == [tok(t, add_special_tokens=False).input_ids for t in ["abc", "de", "fgh"]]
    assert [len(x) for x in corpus.tokenise(tok, ["abc", "de", "fgh"], cap=4, batch=1)] == [3, 2]


def test_separator_is_endoftext_even_when_it_is_also_the_unknown_token(tiny):
    tok = tiny.tokenizer  # like SmolLM2's, its unknown token is <|endoftext|>
    assert tok.unk_token == "<|endoftext|>" and corpus.separator_id(tok) == 0


def test_project_text_is_seeded_and_in_the_project_formats(tiny):
    a, b = corpus.project_chats(40, 3), corpus.project_chats(40, 3)
    assert a == b and a != corpus.project_chats(40, 4)
    numbers = [c[-1]["content"] for c in a[::2]]
    assert all(all(x.isdigit() and len(x) <= 3 for x in n.split(", ")) for n in numbers)
    assert any(c[0]["role"] == "system" for c in a[1::2])
    ids = corpus.project_ids(tiny.tokenizer, 500, seed=3)
    assert sum(map(len, ids)) >= 500 and ids[0][0] == tiny.tokenizer.bos_token_id  # the chat template's start
    assert corpus.project_chats(80, 3)[:40] == a  # more chats keep the first ones


def test_config_rejects_unknown_sources():
    with pytest.raises(ConfigError, match="unknown nope"):
        CorpusConfig(sources=("kjv", "nope"))
    assert "kjv" in CorpusConfig().sources and CorpusConfig().target_tokens >= 5_000_000


# --- end to end on fake packages ------------------------------------------------------------------------------
def _fake_packages(root: Path) -> Path:
    """Files laid out as dict-gcide, wordnet-base and fortunes ship them, with a few documents each."""
    gcide = "\n\n".join(
        f"Word{i} \\Word\\, n.\n   Meaning number {i} of a made-up word, long enough." for i in range(60)
    )
    p = root / "usr/share/dictd/gcide.dict.dz"
    p.parent.mkdir(parents=True)
    p.write_bytes(gzip.compress(gcide.encode(), mtime=0))
    wn = root / "usr/share/wordnet"
    wn.mkdir(parents=True)
    for pos, t in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        lines = [f"{i:08d} 03 {t} 01 {pos}{i} 0 000 | gloss {i} of a {pos}" for i in range(40)]
        (wn / f"data.{pos}").write_text("  1 license line\n" + "\n".join(lines) + "\n")
    fo = root / "usr/share/games/fortunes"
    fo.mkdir(parents=True)
    (fo / "cookie").write_text(
        "\n%\n".join(f"Fortune {i}: a saying that is not too short." for i in range(20))
    )
    (fo / "cookie.dat").write_bytes(b"\x00\x01index")
    (fo / "cookie.u8").symlink_to("cookie")
    return root


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    root = _fake_packages(tmp_path / "pkgroot")

    def fetch(names, cache, scratch):
        return {n: Package(n, root, "1.0-test", "download", f"{n}_1.0_all.deb", "0" * 64, 1) for n in names}

    monkeypatch.setattr(corpus, "fetch", fetch)
    return root


def _cfg(tmp_path: Path, **kw) -> CorpusConfig:
    return CorpusConfig(model="tiny", sources=("gcide", "wordnet", "fortunes"), target_tokens=6000,
                        context_size=32, shard_windows=50, project_share=0.1, deb_cache=str(tmp_path / "debs"),
                        **kw)  # fmt: skip


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "shards").iterdir())}


def test_build_writes_manifest_shards_and_loads(tmp_path, fake_apt, tiny):
    cfg = _cfg(tmp_path)
    m = corpus.run(cfg, tmp_path / "c")
    assert m["windows"] == 188 and m["tokens"] == 188 * 32 >= cfg.target_tokens
    assert [s["name"] for s in m["sources"]] == ["gcide", "wordnet", "fortunes", "project"]
    assert sum(s["tokens_used"] for s in m["sources"]) == m["document_tokens"] >= m["tokens"] - 32
    assert m["sources"][0]["packages"][0] == {"name": "dict-gcide", "version": "1.0-test", "origin": "download",
                                              "deb": "dict-gcide_1.0_all.deb", "deb_sha256": "0" * 64,
                                              "deb_bytes": 1}  # fmt: skip
    proj = m["sources"][-1]
    assert proj["tokens_used"] >= 0.1 * m["tokens"] and proj["share"] < 0.2
    # fortunes has fewer tokens than its equal share: all of it is used; the others share the rest
    fo = m["sources"][2]
    assert fo["docs_used"] == fo["docs"] == 20
    assert len(m["shards"]) == 4 and sum(s["windows"] for s in m["shards"]) == 188
    ds = corpus.load(tmp_path / "c")
    assert len(ds) == 188 and {len(x) for x in ds["input_ids"]} == {32}
    assert (tmp_path / "c/report.md").read_text().count("| fortunes |") == 1
    text = tiny.tokenizer.decode(ds[0]["input_ids"] + ds[1]["input_ids"])
    assert m["separator"] == {"token": "<|endoftext|>", "id": 0} and "<|endoftext|>" in text
    # a finished run is reused; publish copies the small files
    assert corpus.run(cfg, tmp_path / "c") == m
    assert [p.name for p in corpus.publish(tmp_path / "c", tmp_path / "art")] == [
        "manifest.json",
        "report.md",
    ]


def test_build_resumes_after_an_interruption_and_is_deterministic(tmp_path, fake_apt, monkeypatch):
    cfg = _cfg(tmp_path)
    calls: list[str] = []
    real = dict(corpus.SOURCES)

    def counting(name, fail=False):
        def extract(p):
            calls.append(name)
            if fail:
                raise KeyboardInterrupt  # the user stops the build while the second source is extracted
            return real[name].extract(p)

        return corpus.Source(name, real[name].packages, extract, real[name].about)

    monkeypatch.setitem(corpus.SOURCES, "gcide", counting("gcide"))
    monkeypatch.setitem(corpus.SOURCES, "wordnet", counting("wordnet", fail=True))
    with pytest.raises(KeyboardInterrupt):
        corpus.run(cfg, tmp_path / "a")
    assert calls == ["gcide", "wordnet"] and (tmp_path / "a/units/source-gcide.json").is_file()
    monkeypatch.setitem(corpus.SOURCES, "wordnet", counting("wordnet"))
    calls.clear()
    corpus.run(cfg, tmp_path / "a")
    assert calls == ["wordnet"]  # gcide was read back, not extracted again
    corpus.run(cfg, tmp_path / "b")
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert corpus.load(tmp_path / "a")["input_ids"] == corpus.load(tmp_path / "b")["input_ids"]
    other = corpus.run(cfg.replace(seed=1), tmp_path / "s1")
    assert other["shards"][0]["sha256"] != corpus.read_manifest(tmp_path / "a")["shards"][0]["sha256"]


def test_load_rejects_missing_and_corrupt_corpora(tmp_path, fake_apt):
    with pytest.raises(RunFolderError, match="mechsub corpus --out"):
        corpus.load(tmp_path / "none")
    corpus.run(_cfg(tmp_path), tmp_path / "c")
    shard = next((tmp_path / "c/shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorpusError, match="does not match its sha256"):
        corpus.load(tmp_path / "c")


# --- when packages cannot be had --------------------------------------------------------------------------
def test_missing_apt_get_names_the_packages_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_installed_version", lambda name: None)
    monkeypatch.setattr(corpus.shutil, "which", lambda cmd: None)
    with pytest.raises(CorpusError) as e:
        corpus.fetch(["dict-gcide", "wordnet-base"], tmp_path / "debs", tmp_path / "x")
    msg = str(e.value)
    assert "dict-gcide, wordnet-base" in msg and "apt-get download dict-gcide wordnet-base" in msg
    assert "sudo apt-get install dict-gcide wordnet-base" in msg


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "apt-get"  # an apt-get whose mirrors lack the package
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package no-such-pkg' >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(corpus, "_installed_version", lambda name: None)
    with pytest.raises(CorpusError, match=r"no-such-pkg \(E: Unable to locate package no-such-pkg\)"):
        corpus.download(["no-such-pkg"], tmp_path / "debs")


def test_a_cached_deb_is_used_without_apt(tmp_path, monkeypatch):
    cache = tmp_path / "debs"
    cache.mkdir()
    (cache / "dict-gcide_1.0_all.deb").write_bytes(b"x")
    monkeypatch.setattr(corpus.shutil, "which", lambda cmd: None if cmd == "apt-get" else "/usr/bin/" + cmd)
    assert corpus.download(["dict-gcide"], cache) == {"dict-gcide": cache / "dict-gcide_1.0_all.deb"}


def test_cli_builds_and_publishes(tmp_path, fake_apt):
    from typer.testing import CliRunner

    from mechsub.cli import app

    args = ["corpus", "--out", str(tmp_path / "c"), "--artifacts", str(tmp_path / "art")]
    sets = ["model=tiny", 'sources=["gcide","fortunes"]', "target_tokens=2000", "context_size=32",
            f"deb_cache={tmp_path / 'debs'}"]  # fmt: skip
    r = CliRunner().invoke(app, args + [x for s in sets for x in ("--set", s)])
    assert r.exit_code == 0, r.output
    assert "2,016 tokens in 63 windows of 32" in r.output
    assert (tmp_path / "art/manifest.json").read_bytes() == (tmp_path / "c/manifest.json").read_bytes()
    r = CliRunner().invoke(app, ["corpus", "--out", str(tmp_path / "d"), "--set", 'sources=["bible"]'])
    assert r.exit_code == 2 and "unknown bible" in r.output
