"""The HTML page of ``cocomix concepts show --html``: one self-contained file.

Inline CSS and JavaScript only; a Content-Security-Policy forbids every network request. The
text is rendered server-side with every token HTML-escaped; the concepts travel as JSON inside
a ``<script type="application/json">`` block (``<`` escaped, so no text can close it) and the
panel is built with ``textContent`` only, never ``innerHTML``. Hovering a token previews its
concepts, clicking pins them (click again, or press Escape, to unpin); each concept lists its
probability, label frequency and example contexts with the labelled token marked.
"""
from __future__ import annotations

import html
import json

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.15rem; margin: 0 0 .3rem; } p.help { color: #666; margin: 0 0 1rem; font-size: .9rem; }
#layout { display: flex; gap: 1.5rem; align-items: flex-start; }
#text { flex: 1 1 55%; font-family: ui-monospace, monospace; font-size: 1rem; line-height: 2;
        white-space: pre-wrap; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1rem; }
.tok { border-radius: 3px; box-shadow: inset -1px 0 #fff; cursor: pointer; padding: 1px 0; outline: 1px solid transparent; }
.tok:hover, .tok.sel { outline: 2px solid #2563eb; }
#panel { flex: 1 1 45%; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1rem;
         position: sticky; top: 1rem; max-height: 90vh; overflow: auto; font-size: .9rem; }
#panel h2 { font-size: 1rem; margin: 0 0 .6rem; } .concept { border-top: 1px solid #eee; padding: .5rem 0; }
.cid { font-weight: 600; } .meta { color: #555; } .inactive { color: #999; }
.bar { display: inline-block; height: .55rem; background: #2563eb; border-radius: 2px; vertical-align: middle; margin-left: .4rem; }
ol.ex { margin: .3rem 0 0; padding-left: 1.3rem; font-family: ui-monospace, monospace; font-size: .82rem; white-space: pre-wrap; }
mark { background: #fde68a; border-radius: 2px; }
"""

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('data').textContent);
  const panel = document.getElementById('panel');
  let pinned = null;
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(n) { return n.toLocaleString('en-US'); }
  function render(i) {
    const tok = data.tokens[i];
    panel.replaceChildren();
    panel.hidden = false;
    panel.dataset.token = String(i);
    panel.appendChild(el('h2', null, 'token ' + i + ': ' + JSON.stringify(tok.text) + (pinned === i ? ' (pinned)' : '')));
    tok.concepts.forEach(function (c, rank) {
      const box = el('div', 'concept');
      box.dataset.concept = String(c.id);
      const head = el('div');
      head.appendChild(el('span', 'cid', 'concept ' + c.id));
      head.appendChild(el('span', 'meta', '  p ' + c.p.toFixed(3) + ' · logit ' + c.logit.toFixed(2)));
      const bar = el('span', 'bar'); bar.style.width = Math.max(2, Math.round(120 * c.p / data.maxP)) + 'px';
      head.appendChild(bar);
      if (rank >= data.kConcept) head.appendChild(el('span', 'inactive', '  (outside the active top-' + data.kConcept + ')'));
      box.appendChild(head);
      const d = data.dictionary[String(c.id)];
      if (d) {
        box.appendChild(el('div', 'meta', 'a label ' + fmt(d.frequency) + ' times (' + (100 * d.share).toFixed(3) +
          '% of label slots), top-1 ' + fmt(d.top1_frequency) + ' times'));
        const list = el('ol', 'ex');
        d.examples.forEach(function (x) {
          const li = el('li');
          li.title = x.split + ' position ' + x.token_position + ', score ' + x.score.toFixed(4);
          li.appendChild(document.createTextNode(x.left));
          li.appendChild(el('mark', null, x.token));
          li.appendChild(document.createTextNode(x.right));
          list.appendChild(li);
        });
        if (d.examples.length) box.appendChild(list); else box.appendChild(el('div', 'meta', 'never a label in the targets'));
      }
      panel.appendChild(box);
    });
  }
  function select(i) {
    document.querySelectorAll('.tok.sel').forEach(function (t) { t.classList.remove('sel'); });
    if (i !== null) document.querySelector('.tok[data-i="' + i + '"]').classList.add('sel');
  }
  document.querySelectorAll('.tok').forEach(function (span) {
    const i = Number(span.dataset.i);
    span.addEventListener('mouseenter', function () { if (pinned === null) render(i); });
    span.addEventListener('click', function () {
      pinned = pinned === i ? null : i; select(pinned); render(i);
    });
    span.addEventListener('keydown', function (e) { if (e.key === 'Enter') span.click(); });
  });
  document.addEventListener('keydown', function (e) { if (e.key === 'Escape') { pinned = null; select(null); } });
})();
"""


def page_data(concepts, descriptions: dict[int, dict]) -> dict:
    """The JSON the page's script reads: tokens with their concepts, and the dictionary entries."""
    tokens = [{"text": text, "concepts": [{"id": i, "logit": z, "p": p} for i, z, p in zip(ids, zs, ps)]}
              for text, ids, zs, ps in zip(concepts.token_texts, concepts.concept_ids, concepts.logits, concepts.probs)]
    max_p = max((p for ps in concepts.probs for p in ps), default=1.0)
    return {"tokens": tokens, "kConcept": concepts.k_concept, "maxP": max_p or 1.0,
            "dictionary": {str(i): d for i, d in descriptions.items()}}


def _token_spans(concepts) -> str:
    """Token spans shaded by their top concept's probability (relative to the text's highest)."""
    max_p = max((ps[0] for ps in concepts.probs), default=1.0) or 1.0
    spans = []
    for i, (text, ps) in enumerate(zip(concepts.token_texts, concepts.probs)):
        alpha = 0.08 + 0.5 * ps[0] / max_p
        spans.append(f'<span class="tok" tabindex="0" data-i="{i}" style="background: rgba(37, 99, 235, {alpha:.3f})">'
                     f"{html.escape(text)}</span>")
    return "".join(spans)


def render_page(concepts, descriptions: dict[int, dict], title: str) -> str:
    payload = json.dumps(page_data(concepts, descriptions), ensure_ascii=False).replace("<", "\\u003c")
    help_line = "Hover a token to preview the concepts the student predicts there; click to pin (Escape unpins)."
    if not descriptions:
        help_line += " Pass --describe DIR to `cocomix concepts show` for each concept's label frequency and example contexts."
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="help">{html.escape(help_line)}</p>
<div id="layout"><div id="text">{_token_spans(concepts)}</div><div id="panel" hidden></div></div>
<script id="data" type="application/json">{payload}</script>
<script>{SCRIPT}</script>
</body></html>
"""
