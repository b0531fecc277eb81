"""The HTML dashboard's page template, stylesheet and script (kept apart from the rendering code)."""

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'nonce-{{ nonce }}'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>faithlens · {{ v.text|truncate(60) }}</title>
<style>{{ css }}</style>
</head>
<body>
<header class="top">
  <div class="brand">faithlens <span>explain</span></div>
  <div class="meta">
    {% for k, value in v.meta %}
    <span class="chip"><b>{{ k }}</b> {{ value }}</span>
    {% endfor %}
  </div>
</header>
<main>
<section class="hero">
  <div class="card input">
    <h2>Input</h2>
    <p class="text">{{ v.text }}</p>
  </div>
  <div class="card predict">
    <h2>Next token</h2>
    <div class="next"><code class="token big">{{ v.next_token }}</code><span class="conf">{{ v.confidence }}</span></div>
    <div class="meter" role="img" aria-label="confidence {{ v.confidence }}"><i style="width: {{ v.conf_w }}%"></i></div>
    <p class="frozen">Frozen model: <code class="token">{{ v.frozen_next_token }}</code> {{ v.frozen_confidence }}
      {% if v.agrees %}<span class="badge ok">agrees</span>{% else %}<span class="badge bad">disagrees</span>{% endif %}</p>
    {% if v.top %}
    <ol class="topk">
      {% for tok, p, w in v.top %}
      <li><code class="token">{{ tok }}</code><span class="mini"><i style="width: {{ w }}%"></i></span><span class="num">{{ p }}</span></li>
      {% endfor %}
    </ol>
    {% endif %}
  </div>
  <div class="card faith">
    <h2>Faithfulness</h2>
    <dl>
      {% for name, value, meaning in v.faith %}
      <div class="stat" title="{{ meaning }}"><dt>{{ name }}</dt><dd>{{ value }}</dd><p>{{ meaning }}</p></div>
      {% endfor %}
    </dl>
  </div>
</section>

<section class="card tokens-card">
  <h2>Tokens <small>hover, click or tab through a token to see its strongest features</small></h2>
  <div class="tokens-layout">
    <div class="strip" role="listbox" aria-label="input tokens">
      {% for t in v.tokens %}<span class="tok{% if t.hot %} hot{% endif %}" data-pos="{{ t.pos }}" tabindex="0" role="option" style="background: {{ t.bg }}" title="peak activation {{ t.act }}">{{ t.text }}</span>{% endfor %}
    </div>
    <aside id="token-features" aria-live="polite"><p class="hint">Select a token.</p></aside>
  </div>
  <div class="legend"><span>activation</span><i class="scale"></i><span>low → high</span></div>
</section>

{% if v.explanations %}
<section class="card explanations">
  <h2>Explanation</h2>
  {% for title, text in v.explanations %}
  <figure><figcaption>{{ title }}</figcaption><blockquote>{{ text }}</blockquote></figure>
  {% endfor %}
</section>
{% endif %}

{% if v.trace %}
<section class="card">
  <details open><summary><h2>Reasoning trace</h2></summary>
  <ol class="trace">{% for line in v.trace %}<li>{{ line }}</li>{% endfor %}</ol>
  </details>
</section>
{% endif %}

<section>
  <h2 class="section">Features <small>ranked by |attribution| to the prediction</small></h2>
  <div class="grid">
  {% for f in v.features %}
  <article class="card feature" id="f-{{ f.id }}">
    <header>
      <span class="rank">#{{ loop.index }}</span>
      <h3>{% if f.label %}<span class="label {{ f.status }}">{{ f.label }}</span> <span class="badge {{ f.status }}" title="{{ f.status_meaning }}">{{ f.status_text }}</span>{% else %}<span class="unlabelled">unlabelled</span>{% endif %}</h3>
      <span class="fid">feature {{ f.id }}</span>
    </header>
    <div class="figures">
      <div><span>peak activation</span><b>{{ f.act }}</b></div>
      <div><span>attribution</span><b class="{{ 'neg' if f.attr_neg else 'pos' }}">{{ f.attr }}</b></div>
      <div><span>share</span><b>{{ f.share }}</b></div>
      <div><span>density</span><b>{{ f.density }}</b></div>
    </div>
    <div class="attr {{ 'neg' if f.attr_neg else 'pos' }}"><i style="width: {{ f.attr_w }}%"></i></div>
    {% if f.scores %}
    <div class="scores">{% for k, s in f.scores %}<span class="chip"><b>{{ k }}</b> {{ s }}</span>{% endfor %}</div>
    {% endif %}
    {% if f.examples %}
    <h4>Top-activating contexts</h4>
    {% for ex in f.examples %}
    <p class="example">{% for t in ex %}<span class="{{ 'ctr' if t.center else '' }} {{ 'hot' if t.hot else '' }}" style="background: {{ t.bg }}" title="{{ t.act }}">{{ t.text }}</span>{% endfor %}</p>
    {% endfor %}
    {% endif %}
    {% if f.promoted %}
    <h4>Promotes</h4>
    <div class="promoted">{% for tok, w in f.promoted %}<code class="token" title="{{ w }}">{{ tok }}</code>{% endfor %}</div>
    {% endif %}
    {% if f.hist %}
    <h4>Activation distribution <small>(log counts; line = this input)</small></h4>
    <svg class="hist" viewBox="0 0 {{ f.hist.w }} {{ f.hist.h }}" width="100%" height="{{ f.hist.h }}" preserveAspectRatio="none" role="img" aria-label="activation histogram">
      {% for b in f.hist.bars %}<rect x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ b.h }}"><title>{{ b.lo }}–{{ b.hi }}: {{ b.count }}</title></rect>{% endfor %}
      {% if f.hist.marker is not none %}<line x1="{{ f.hist.marker }}" x2="{{ f.hist.marker }}" y1="0" y2="{{ f.hist.h }}"/>{% endif %}
    </svg>
    <div class="axis"><span>{{ f.hist.lo }}</span><span>{{ f.hist.hi }}</span></div>
    {% endif %}
  </article>
  {% endfor %}
  </div>
</section>
</main>
<footer>Generated by faithlens. Labels and contexts come from data and model output; they are shown as text, never run.</footer>
<script type="application/json" id="data">{{ data }}</script>
<script nonce="{{ nonce }}">{{ js }}</script>
</body>
</html>
"""

_CSS = """
:root { --bg: #f6f7f9; --card: #fff; --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --accent: #e8710a;
  --pos: #12a150; --neg: #d92d20; --chip: #eef1f5; --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
  color-scheme: light dark; }
@media (prefers-color-scheme: dark) { :root { --bg: #0f1218; --card: #171b24; --fg: #e6e9ef; --muted: #98a2b3;
  --line: #2a303c; --chip: #232936; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header.top { display: flex; flex-wrap: wrap; gap: .75rem; align-items: center; justify-content: space-between;
  padding: .9rem clamp(1rem, 3vw, 2.5rem); border-bottom: 1px solid var(--line); background: var(--card); }
.brand { font-weight: 700; font-size: 1.1rem; letter-spacing: .01em; }
.brand span { color: var(--accent); font-weight: 600; }
main { max-width: 1280px; margin: 0 auto; padding: 1.25rem clamp(1rem, 3vw, 2.5rem) 2rem; }
h2 { font-size: .8rem; text-transform: uppercase; letter-spacing: .08em; color: var(--muted); margin: 0 0 .6rem; }
h2 small, h4 small { text-transform: none; letter-spacing: 0; font-weight: 400; margin-left: .4rem; }
h2.section { margin: 1.5rem 0 .75rem; }
h3 { margin: 0; font-size: 1.02rem; overflow-wrap: anywhere; }
h4 { margin: .9rem 0 .35rem; font-size: .78rem; color: var(--muted); font-weight: 600; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 1rem 1.15rem;
  box-shadow: 0 1px 2px rgba(16, 24, 40, .04); }
section.card, .hero { margin-bottom: 1rem; }
.hero { display: grid; gap: 1rem; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); }
.input .text { font-size: 1.15rem; margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.chip { display: inline-block; background: var(--chip); border-radius: 999px; padding: .1rem .6rem; font-size: .8rem;
  margin: .1rem .15rem; overflow-wrap: anywhere; }
.chip b { color: var(--muted); font-weight: 600; }
code, .token { font-family: var(--mono); }
.token { background: var(--chip); border-radius: 5px; padding: 0 .3rem; white-space: pre; }
.next { display: flex; align-items: baseline; gap: .8rem; }
.token.big { font-size: 1.8rem; font-weight: 700; padding: .1rem .5rem; }
.conf { font-size: 1.4rem; font-weight: 600; color: var(--accent); }
.meter, .mini, .attr { background: var(--chip); border-radius: 999px; overflow: hidden; height: 8px; }
.meter { margin: .5rem 0 .6rem; }
.meter i, .mini i, .attr i { display: block; height: 100%; background: var(--accent); border-radius: inherit; }
.frozen { margin: .2rem 0; color: var(--muted); }
.badge { border-radius: 999px; padding: .05rem .55rem; font-size: .78rem; font-weight: 600; color: #fff; }
.badge.ok { background: var(--pos); } .badge.bad { background: var(--neg); }
.badge.verified { background: var(--pos); } .badge.statistic { background: var(--muted); }
.badge.unverified { background: var(--accent); } .badge { white-space: nowrap; }
.label.unverified, .label.statistic, .lbl.unverified, .lbl.statistic { color: var(--muted); }
.status { font-size: .72rem; color: var(--muted); white-space: nowrap; }
.topk { list-style: none; padding: 0; margin: .5rem 0 0; display: grid; gap: .25rem; }
.topk li { display: grid; grid-template-columns: minmax(3rem, 45%) 1fr 3rem; gap: .6rem; align-items: center; font-size: .9rem; }
.num { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
.faith dl { margin: 0; display: grid; grid-template-columns: 1fr 1fr; gap: .7rem; }
.stat dt { font-size: .78rem; color: var(--muted); }
.stat dd { margin: 0; font-size: 1.5rem; font-weight: 700; font-variant-numeric: tabular-nums; }
.stat p { margin: 0; font-size: .72rem; color: var(--muted); line-height: 1.3; }
.tokens-layout { display: grid; grid-template-columns: minmax(0, 2fr) minmax(260px, 1fr); gap: 1rem; align-items: start; }
@media (max-width: 760px) { .tokens-layout { grid-template-columns: 1fr; } .faith dl { grid-template-columns: 1fr; } }
/* tokens are adjacent spans with no whitespace between them: flex-wrap gives the line breaks */
.strip { font-family: var(--mono); font-size: 1.05rem; line-height: 1.6; display: flex; flex-wrap: wrap; row-gap: .45rem;
  align-items: center; min-width: 0; }
.tok { white-space: pre; padding: .15rem .1rem; border-radius: 4px; cursor: pointer; outline: 1px solid var(--line);
  outline-offset: -1px; margin-right: 1px; }
.tok:hover, .tok:focus-visible, .tok.sel { outline: 2px solid var(--fg); }
.hot { color: #1d2330; }
#token-features { border-left: 3px solid var(--accent); padding: .2rem 0 .2rem .9rem; min-height: 6rem; }
#token-features h3 { font-size: .9rem; margin-bottom: .4rem; }
#token-features ol { margin: 0; padding: 0; list-style: none; display: grid; gap: .3rem; }
#token-features li { display: grid; grid-template-columns: 3.6rem 1fr auto 3.2rem; gap: .5rem; align-items: center; font-size: .88rem; }
#token-features li a, #token-features li .fid { font-family: var(--mono); color: var(--muted); font-size: .8rem; }
#token-features .lbl { overflow-wrap: anywhere; }
#token-features .act { text-align: right; font-variant-numeric: tabular-nums; }
.hint, .unlabelled { color: var(--muted); font-style: italic; }
.legend { display: flex; align-items: center; gap: .5rem; font-size: .75rem; color: var(--muted); margin-top: .6rem; }
.scale { display: inline-block; width: 120px; height: 8px; border-radius: 4px;
  background: linear-gradient(90deg, rgba(245, 140, 20, .1), rgba(245, 140, 20, .9)); }
.explanations figure { margin: 0 0 .6rem; }
.explanations figcaption { font-size: .78rem; color: var(--muted); font-weight: 600; }
.explanations blockquote { margin: .15rem 0 0; font-size: 1.02rem; overflow-wrap: anywhere; }
details summary { cursor: pointer; list-style: none; } details summary h2 { display: inline; }
.trace { margin: .4rem 0 0; padding-left: 1.6rem; font-family: var(--mono); font-size: .85rem; }
.trace li { margin: .15rem 0; overflow-wrap: anywhere; white-space: pre-wrap; }
.grid { display: grid; gap: 1rem; grid-template-columns: repeat(auto-fill, minmax(min(100%, 360px), 1fr)); }
.feature header { display: flex; gap: .6rem; align-items: baseline; }
.feature:target { outline: 2px solid var(--accent); }
.rank { color: var(--accent); font-weight: 700; }
.fid { margin-left: auto; font-family: var(--mono); font-size: .78rem; color: var(--muted); white-space: nowrap; }
.figures { display: grid; grid-template-columns: repeat(4, 1fr); gap: .4rem; margin: .7rem 0 .4rem; }
.figures span { display: block; font-size: .7rem; color: var(--muted); }
.figures b { font-variant-numeric: tabular-nums; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
.attr.pos i { background: var(--pos); } .attr.neg i { background: var(--neg); }
.scores { margin-top: .5rem; }
.example { font-family: var(--mono); font-size: .82rem; margin: .25rem 0; padding: .35rem .5rem; background: var(--bg);
  border-radius: 6px; overflow-wrap: anywhere; line-height: 1.8; }
.example span { white-space: pre-wrap; border-radius: 3px; }
.example .ctr { outline: 1.5px solid var(--fg); outline-offset: 0; }
.promoted { display: flex; flex-wrap: wrap; gap: .3rem; }
.topk .token, .promoted .token { white-space: pre-wrap; overflow-wrap: anywhere; justify-self: start; }
.hist { display: block; background: var(--bg); border-radius: 6px; }
.hist rect { fill: var(--accent); opacity: .75; } .hist line { stroke: var(--neg); stroke-width: 2; }
.axis { display: flex; justify-content: space-between; font-size: .7rem; color: var(--muted); font-variant-numeric: tabular-nums; }
footer { text-align: center; color: var(--muted); font-size: .75rem; padding: 1rem 1rem 2rem; }
"""

# Builds the token panel from the embedded JSON with createElement/textContent only: data never becomes markup.
_JS = """
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  const panel = document.getElementById("token-features");
  const toks = Array.from(document.querySelectorAll(".tok"));
  const cards = new Set(Array.from(document.querySelectorAll("article.feature")).map((a) => a.id));
  const visible = (s) => String(s).replace(/\\n/g, "\\u23ce").replace(/\\t/g, "\\u21e5");
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  function show(pos) {
    const tok = (data.tokens || [])[pos];
    if (!tok) return;
    toks.forEach((t) => t.classList.toggle("sel", Number(t.dataset.pos) === pos));
    const head = el("h3", null, "Position " + pos + " ");
    head.appendChild(el("code", "token", visible(tok.text)));
    const list = el("ol");
    const feats = tok.features || [];
    const top = Math.max(1e-9, ...feats.map((f) => Math.abs(Number(f.activation) || 0)));
    for (const f of feats) {
      const li = el("li");
      const id = Number(f.id);
      const ref = cards.has("f-" + id) ? el("a", null, "#" + id) : el("span", "fid", "#" + id);
      if (ref.tagName === "A") ref.href = "#f-" + id;
      li.appendChild(ref);
      const status = ["verified", "statistic"].includes(f.label_status) ? f.label_status : "unverified";
      li.appendChild(f.label ? el("span", "lbl " + status, String(f.label)) : el("span", "lbl unlabelled", "unlabelled"));
      li.appendChild(el("span", "status", f.label ? status : ""));
      const act = el("span", "act", (Number(f.activation) || 0).toFixed(2));
      act.style.background = "rgba(245, 140, 20, " + (0.1 + 0.8 * Math.abs(Number(f.activation) || 0) / top).toFixed(3) + ")";
      li.appendChild(act);
      list.appendChild(li);
    }
    panel.replaceChildren(head, feats.length ? list : el("p", "hint", "No active features at this position."));
  }
  toks.forEach((t, i) => {
    const pos = Number(t.dataset.pos);
    t.addEventListener("mouseenter", () => show(pos));
    t.addEventListener("focus", () => show(pos));
    t.addEventListener("click", () => { t.focus(); show(pos); });
    t.addEventListener("keydown", (ev) => {
      const next = ev.key === "ArrowRight" ? toks[i + 1] : ev.key === "ArrowLeft" ? toks[i - 1] : null;
      if (next) { ev.preventDefault(); next.focus(); }
    });
  });
  if (toks.length) show(Number(toks[toks.length - 1].dataset.pos));
})();
"""
