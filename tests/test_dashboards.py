import base64
import io
import json
import re

import pytest
import torch

from mechsub import dashboards, hooks, views
from mechsub.prompts import word_ids

HOOK = hooks.resid_post(0)
SINK = 3  # the latent built to read the position-0 residual


def _sae(d_in=64, d_sae=32, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=HOOK)))


def _contexts(n=7, seed=0):
    """Random tokens after the BOS (id 1), of different lengths, so batches are right-padded."""
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 99, (8 + 3 * (i % 4),), generator=g).tolist()] for i in range(n)]


@pytest.fixture(scope="module")
def case(tiny):
    """An SAE whose latent SINK points along the position-0 residual, so its global maximum is at position 0."""
    sae = _sae()
    ctxs = _contexts()
    h0 = hooks.read(tiny, torch.tensor([ctxs[0]]), [HOOK])[HOOK][0, 0]
    with torch.no_grad():
        sae.W_enc[:, SINK] = 10 * h0 / h0.norm()
    return sae, ctxs


def _brute(lm, sae, contexts):
    """Every position's encoding, one unpadded forward per context: [(pos, d_sae)]."""
    return [sae.encode(hooks.read(lm, torch.tensor([c]), [HOOK])[HOOK][0]).detach() for c in contexts]


def _page_tops(page, latent):
    section = page.split(f'data-latent="{latent}"', 1)[1].split("</section>", 1)[0]
    return [(int(c), int(p)) for c, p in re.findall(r'data-context="(\d+)" data-position="(\d+)"', section)]


def test_top_contexts_are_the_true_maxima_and_never_position_0(tiny, case):
    sae, ctxs = case
    brute = _brute(tiny, sae, ctxs)
    # the case is built so that position 0 would win: the sink latent's largest activation anywhere is there
    everywhere = [(float(a[p, SINK]), c, p) for c, a in enumerate(brute) for p in range(len(a))]
    assert max(everywhere)[2] == 0
    page = dashboards.feature_dashboard(tiny, sae, [SINK, 5], ctxs, top_k=6, batch_size=3, context_window=4)
    enc = dashboards.encode_contexts(tiny, sae, ctxs, [SINK, 5], batch_size=3)
    for latent in (SINK, 5):
        want = sorted(((float(a[p, latent]), c, p) for c, a in enumerate(brute) for p in range(1, len(a))),
                      reverse=True)[:6]  # fmt: skip
        want = [w for w in want if w[0] > 0]
        got = dashboards.top_activations(enc, latent, 6)
        assert [(c, p) for c, p, _ in got] == [(c, p) for _, c, p in want]
        assert [v for *_, v in got] == pytest.approx([v for v, *_ in want], abs=1e-5)
        assert _page_tops(page, latent) == [(c, p) for _, c, p in want]
    # position 0 is nowhere: not a maximum, not a context token, not a histogram count
    assert all(p >= hooks.FIRST_POSITION for c, p in _page_tops(page, SINK))
    assert enc.acts.shape[0] == sum(len(c) - 1 for c in ctxs)
    assert f"{enc.acts.shape[0]:,} tokens read" in page


def test_logit_effect_is_the_decoder_row_through_the_unembedding(tiny, case):
    sae, ctxs = case
    words = ["owl", "dog", "otter"]
    page = dashboards.feature_dashboard(tiny, sae, [7], ctxs, trait_words=words, n_logits=10)
    effect = sae.W_dec[7].detach() @ tiny.model.get_output_embeddings().weight.detach().T
    order = torch.argsort(effect, descending=True).tolist()
    section = page.split('data-latent="7"', 1)[1]
    top = section.split('class="logit-top"', 1)[1].split("</table>", 1)[0]
    bottom = section.split('class="logit-bottom"', 1)[1].split("</table>", 1)[0]
    assert [int(i) for i in re.findall(r'data-token-id="(\d+)"', top)] == order[:10]
    assert [int(i) for i in re.findall(r'data-token-id="(\d+)"', bottom)] == order[::-1][:10]
    scores = dict((m.word, s) for m, s in dashboards.word_scores(tiny.tokenizer, effect, words))
    for w in words:  # a word's score: the sum over the tokens of " word" (four characters for " owl" here)
        assert scores[w] == pytest.approx(float(effect[word_ids(tiny.tokenizer, w)].sum()), abs=1e-5)
    ranked = re.findall(r'data-word="(\w+)"', section)
    assert ranked == sorted(words, key=lambda w: -scores[w])


def test_page_is_offline_and_renders_in_headless_chromium(tiny, case, tmp_path, request):
    from PIL import Image

    sae, ctxs = case
    page = dashboards.feature_dashboard(tiny, sae, [SINK, 5], ctxs, source="test contexts")
    assert views.is_offline(page) and "<script" not in page
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 2
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0]))).size[0] > 200  # the inline histogram decodes
    assert page == dashboards.feature_dashboard(tiny, sae, [SINK, 5], ctxs, source="test contexts")
    ink = request.getfixturevalue("ink")  # skips here where chromium is missing: the checks above still ran
    dashboards.write_dashboard(tmp_path / "d.html", page)
    # measured ~100k: headings and text alone are a few thousand, the shaded tokens, tables and histogram the rest
    assert ink(tmp_path / "d.html") > 20_000


def test_bad_input_says_what_to_fix(tiny, case):
    sae, ctxs = case
    with pytest.raises(ValueError, match=r"unknown latent id\(s\) 32: the SAE has d_sae = 32"):
        dashboards.feature_dashboard(tiny, sae, [1, 32], ctxs)
    with pytest.raises(ValueError, match="d_in = 48, but tiny has d_model = 64"):
        dashboards.feature_dashboard(tiny, _sae(d_in=48), [1], ctxs)
    with pytest.raises(ValueError, match="no contexts"):
        dashboards.feature_dashboard(tiny, sae, [1], [])
    with pytest.raises(ValueError, match="context 1 has 1 token"):
        dashboards.feature_dashboard(tiny, sae, [1], [ctxs[0], [1]])
    with pytest.raises(ValueError, match="comma-separated"):
        dashboards.parse_latents("12,x")


def test_dashboard_command(tiny, case, tmp_path):
    from typer.testing import CliRunner

    from mechsub.cli import app

    sae, _ = case
    sae.save_model(tmp_path / "run" / "sae")  # a `mechsub sae` run folder holds the SAE in sae/
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "\n".join(json.dumps(t) for t in ["12, 45, 67, 89", {"text": "a cat sat on 3 mats"}]) + "\n"
    )
    out = tmp_path / "dash.html"
    args = [
        "dashboard",
        str(tmp_path / "run"),
        "--model",
        "tiny",
        "--latents",
        f"{SINK},2",
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(app, [*args, "--contexts", str(texts)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert 'data-latent="2"' in page and "2 contexts" in page and views.is_offline(page)
    r = CliRunner().invoke(app, [*args, "--contexts", str(texts), "--latents", "40"])
    assert r.exit_code == 2 and "unknown latent id(s) 40" in r.output
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "no contexts" in r.output
    r = CliRunner().invoke(app, ["dashboard", str(tmp_path / "nowhere"), "--model", "tiny", "--latents", "1",
                                 "--contexts", str(texts)])  # fmt: skip
    assert r.exit_code == 2 and "no SAE folder at" in r.output
