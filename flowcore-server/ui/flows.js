// Flows: the list (with each flow's last run and run count), and a flow's page: its DAG, a
// node's definition, its versions and their differences, an editor checked by the server's
// compiler as you type, and a form to start a run.

import {api, get, post, ApiError} from './api.js';
import {h, fill, json, badge, time, route, debounce} from './dom.js';
import {draw} from './dag.js';
import {diffLines} from './diff.js';

const enc = encodeURIComponent;

export async function flowsPage(main, q, signal) {
  const page = await get(route('/flows', {limit: 50, cursor: q.get('cursor')}));
  const usage = await get('/usage').catch(() => ({items: []}));
  if (signal.aborted) return;
  const counts = new Map();
  for (const day of usage.items) counts.set(day.flow_id, (counts.get(day.flow_id) || 0) + day.runs);
  const rows = page.items.map((f) => {
    const last = h('td', {class: 'muted'}, '…');
    get(route('/runs', {flow_id: f.id, limit: 1})).then((runs) => {
      const run = runs.items[0];
      fill(last, run
        ? h('a', {href: `#/runs/${enc(run.id)}`}, badge(run.status), ' ', time(run.created_at))
        : h('span', {class: 'muted'}, 'never run'));
    }, () => fill(last, '—'));
    return h('tr', {},
      h('td', {}, h('a', {href: `#/flows/${enc(f.id)}`}, f.name || f.id)),
      h('td', {class: 'mono'}, f.id),
      h('td', {class: 'num'}, `v${f.version}`),
      last,
      h('td', {class: 'num'}, String(counts.get(f.id) || 0)),
      h('td', {}, time(f.created_at)));
  });
  if (signal.aborted) return;
  fill(main,
    h('div', {class: 'bar'}, h('h1', {}, 'Flows'), h('span', {class: 'grow'}),
      h('a', {class: 'button', href: '#/new-flow'}, 'New flow')),
    rows.length
      ? h('table', {class: 'list'},
        h('thead', {}, h('tr', {}, ['Name', 'Id', 'Version', 'Last run', 'Runs (30 days)', 'Changed']
          .map((t) => h('th', {scope: 'col'}, t)))),
        h('tbody', {}, rows))
      : h('div', {class: 'card empty'}, h('p', {}, 'No flow yet.'),
        h('p', {class: 'muted'}, 'Create one here, or POST a flow to /api/v1/flows.')),
    page.next_cursor
      ? h('p', {}, h('a', {href: route('#/flows', {cursor: page.next_cursor})}, 'Next page →'))
      : null);
}

const STARTER = {
  name: 'My flow',
  nodes: [{id: 'hello', type: 'set', params: {fields: {greeting: 'hello {{ input.name }}'}}}],
  edges: [],
  triggers: [{type: 'webhook', path: 'my-flow', mode: 'sync'}],
};

export async function flowPage(main, id, q, signal) {
  const isNew = id === null;
  const latest = isNew ? null : await get(`/flows/${enc(id)}`);
  const version = q.get('version') ? Number(q.get('version')) : latest?.version;
  const shown = !isNew && version !== latest.version
    ? await get(route(`/flows/${enc(id)}`, {version}))
    : latest;
  if (signal.aborted) return;
  const tab = isNew ? 'edit' : (q.get('tab') || 'graph');
  const link = (t, extra) => route(`#/flows/${enc(id)}`, {tab: t, version: version !== latest?.version ? version : null, ...extra});
  const tabs = isNew ? null : h('nav', {class: 'tabs', 'aria-label': 'flow'},
    [['graph', 'Graph'], ['versions', 'Versions'], ['edit', 'Edit'], ['run', 'Start a run']]
      .map(([t, label]) => h('a', {href: link(t), 'aria-current': tab === t ? 'page' : null}, label)),
    h('a', {href: route('#/runs', {flow_id: id})}, 'Runs →'));
  const body = h('section', {class: 'tabbody'});
  fill(main,
    h('div', {class: 'bar'},
      h('h1', {}, isNew ? 'New flow' : (shown.definition.name || id)),
      isNew ? null : h('span', {class: 'muted mono'}, `${id} · v${shown.version}${shown.version !== latest.version ? ` (latest v${latest.version})` : ''}`)),
    shown?.definition.description ? h('p', {class: 'muted'}, shown.definition.description) : null,
    tabs, body);
  if (tab === 'graph') graphTab(body, shown);
  else if (tab === 'versions') await versionsTab(body, latest, q, signal);
  else if (tab === 'edit') editTab(body, isNew ? null : latest, signal);
  else if (tab === 'run') runTab(body, latest);
}

function graphTab(body, flow) {
  const def = flow.definition;
  const nodes = new Map(def.nodes.map((n) => [n.id, n]));
  const detail = h('aside', {class: 'detail card', 'aria-live': 'polite'},
    h('p', {class: 'muted'}, 'Select a node to see its definition.'));
  let direction = 'TB';
  const graph = h('div', {class: 'graph'});
  const select = (nodeId) => {
    const n = nodes.get(nodeId);
    fill(detail, h('h2', {}, n.id), h('p', {class: 'muted'}, n.type),
      h('h3', {}, 'Params'), json(n.params || {}),
      ...['retry', 'timeout_ms', 'on_error'].filter((k) => n[k] !== undefined)
        .map((k) => [h('h3', {}, k), json(n[k])]));
    redraw(nodeId);
  };
  const redraw = (selected) => fill(graph, draw(def, {onSelect: select, selected, direction}));
  redraw();
  const flip = h('button', {type: 'button', class: 'quiet', onclick: () => {
    direction = direction === 'TB' ? 'LR' : 'TB';
    flip.textContent = direction === 'TB' ? 'Left to right' : 'Top down';
    redraw();
  }}, 'Left to right');
  fill(body,
    h('div', {class: 'split'}, h('div', {},
      h('div', {class: 'bar'}, h('span', {class: 'grow'}), flip), graph), detail),
    h('h2', {}, 'Triggers'),
    (def.triggers || []).length
      ? h('ul', {}, def.triggers.map((t) => h('li', {class: 'mono'},
        t.type === 'webhook' ? `webhook ${t.method || 'POST'} /webhooks/${t.path} (${t.mode || 'sync'})`
          : t.type === 'schedule' ? `schedule ${t.cron}` : JSON.stringify(t))))
      : h('p', {class: 'muted'}, 'None: runs start through the API.'),
    def.settings ? [h('h2', {}, 'Settings'), json(def.settings)] : null);
}

async function versionsTab(body, latest, q, signal) {
  const id = latest.id;
  const newest = latest.version;
  const oldest = Math.max(1, newest - 19);
  const b = Number(q.get('b') || newest);
  const a = Number(q.get('a') || Math.max(1, b - 1));
  const list = [];
  for (let v = newest; v >= oldest; v--) list.push(v);
  const fetchVersion = (v) => (v === newest ? Promise.resolve(latest) : get(route(`/flows/${enc(id)}`, {version: v})));
  const [va, vb] = await Promise.all([fetchVersion(a), fetchVersion(b)]);
  if (signal.aborted) return;
  const text = (f) => JSON.stringify(f.definition, null, 2);
  const lines = diffLines(text(va), text(vb));
  const changed = lines.filter((l) => l.op !== ' ').length;
  const picker = (name, value) => h('select', {name, 'aria-label': name === 'a' ? 'from version' : 'to version',
    onchange: (e) => { location.hash = route(`#/flows/${enc(id)}`, {tab: 'versions', a, b, [name]: e.target.value}); }},
  list.map((v) => h('option', {value: v, selected: v === value}, `v${v}`)));
  fill(body,
    h('table', {class: 'list'},
      h('thead', {}, h('tr', {}, h('th', {}, 'Version'), h('th', {}, ''))),
      h('tbody', {}, list.map((v) => h('tr', {},
        h('td', {}, h('a', {href: route(`#/flows/${enc(id)}`, {version: v})}, `v${v}`), v === newest ? ' (latest)' : ''),
        h('td', {}, v > 1 ? h('a', {href: route(`#/flows/${enc(id)}`, {tab: 'versions', a: v - 1, b: v})}, `changes from v${v - 1}`) : 'first version'))))),
    newest > 20 ? h('p', {class: 'muted'}, `The 20 latest of ${newest} versions.`) : null,
    h('div', {class: 'bar'}, h('h2', {}, 'Differences'), picker('a', a), '→', picker('b', b),
      h('span', {class: 'muted'}, `${changed} changed lines`)),
    h('pre', {class: 'diff'}, lines.map((l) => h('div', {class: l.op === '+' ? 'add' : l.op === '-' ? 'del' : 'same'}, `${l.op} ${l.line}`))));
}

/** Where a problem is, for the list: the node, the edge or the flow. */
function where(p) {
  if (p.node) return `node ${p.node}`;
  if (p.edge !== null && p.edge !== undefined) return `edge ${p.edge}`;
  return 'flow';
}

function editTab(body, latest, signal) {
  const start = latest ? {...latest.definition} : STARTER;
  const area = h('textarea', {class: 'editor', spellcheck: 'false', 'aria-label': 'the flow as JSON', rows: 28},
    JSON.stringify(start, null, 2));
  area.value = JSON.stringify(start, null, 2);
  const problems = h('div', {class: 'problems', 'aria-live': 'polite'});
  const preview = h('div', {class: 'graph'});
  const save = h('button', {type: 'submit'}, latest ? `Save as v${latest.version + 1}` : 'Create');
  const status = h('span', {class: 'muted'});
  let seq = 0;
  const check = async () => {
    const mine = ++seq;
    let parsed;
    try {
      parsed = JSON.parse(area.value);
    } catch (e) {
      fill(problems, h('ul', {}, h('li', {class: 'error'}, `JSON: ${e.message}`)));
      return;
    }
    let found = [];
    try {
      await post('/flows?dry_run=true', area.value);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      found = Array.isArray(e.details) ? e.details : [{node: null, edge: null, problem: e.message}];
    }
    if (mine !== seq || signal.aborted) return;
    const byNode = new Map();
    for (const p of found) if (p.node) byNode.set(p.node, [...(byNode.get(p.node) || []), p.problem]);
    fill(preview, draw(parsed, {
      status: (nid) => (byNode.has(nid) ? 'problem' : ''),
      note: (nid) => (byNode.has(nid) ? `⚠ ${byNode.get(nid)[0]}` : null),
    }));
    fill(problems, found.length
      ? h('ul', {}, found.map((p) => h('li', {class: 'error'}, h('strong', {}, where(p)), ': ', p.problem)))
      : h('p', {class: 'ok'}, '✓ The flow compiles.'));
  };
  const form = h('form', {class: 'edit', onsubmit: async (e) => {
    e.preventDefault();
    fill(status, 'saving…');
    try {
      const saved = latest
        ? await api('PUT', `/flows/${enc(latest.id)}`, area.value)
        : await post('/flows', area.value);
      location.hash = `#/flows/${enc(saved.id)}`;
    } catch (err) {
      fill(status, h('span', {class: 'error'}, `${err.code}: ${err.message}`));
      check();
    }
  }}, h('div', {class: 'split'}, h('div', {}, area), h('div', {}, h('h2', {}, 'Problems'), problems, h('h2', {}, 'Preview'), preview)),
  h('div', {class: 'bar'}, save, status));
  area.addEventListener('input', debounce(check, 250));
  area.addEventListener('keydown', (e) => {
    // Tab indents inside the editor; Escape then Tab leaves it (keyboard users are not trapped).
    if (e.key === 'Tab' && !e.shiftKey && !area.dataset.escaped) {
      e.preventDefault();
      area.setRangeText('  ', area.selectionStart, area.selectionEnd, 'end');
      area.dispatchEvent(new Event('input'));
    } else if (e.key === 'Escape') {
      area.dataset.escaped = '1';
    } else {
      delete area.dataset.escaped;
    }
  });
  fill(body, form, h('p', {class: 'muted'}, 'Tab indents; Escape, then Tab, leaves the editor.'));
  check();
}

function runTab(body, latest) {
  const area = h('textarea', {class: 'editor small', spellcheck: 'false', 'aria-label': 'the run input as JSON', rows: 8});
  area.value = '{}';
  const status = h('p', {role: 'alert'});
  fill(body, h('form', {class: 'card', onsubmit: async (e) => {
    e.preventDefault();
    let input;
    try { input = JSON.parse(area.value); } catch (err) { fill(status, h('span', {class: 'error'}, `JSON: ${err.message}`)); return; }
    try {
      const run = await post(`/flows/${enc(latest.id)}/runs`, {input, wait: false});
      location.hash = `#/runs/${enc(run.run_id)}`;
    } catch (err) {
      fill(status, h('span', {class: 'error'}, `${err.code}: ${err.message}`));
    }
  }}, h('h2', {}, `Start a run of v${latest.version}`), h('label', {}, 'Input'), area,
  h('div', {class: 'bar'}, h('button', {type: 'submit'}, 'Start'), status)));
}
